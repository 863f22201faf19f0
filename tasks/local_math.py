"""MATH-500 scoring: answer extraction and a simple equivalence check (no network, no antlr).

The prompt is Minerva's 4-shot format (as lm-eval's ``minerva_math500``), whose examples end
with "Final Answer: The final answer is X. I hope it is correct." The prediction is that X,
else the last ``\\boxed{...}`` of the output. Predicted and gold answers are normalized
(``normalize``: strip ``$``, ``\\left``/``\\right``, spacing commands, ``\\text{...}`` units,
``\\dfrac`` -> ``\\frac``, trailing period...) and count as equal when the strings match, or,
failing that, when both parse as plain numbers (integers, decimals, ``\\frac{a}{b}``, ``a/b``,
percent, thousands separators) of equal value. Symbolic equivalence (``sqrt(2)/2`` vs
``1/sqrt(2)``) is not attempted: it needs sympy's LaTeX parser (antlr) and timeouts, and the
string match already covers MATH's canonical answers.
"""

from __future__ import annotations

import re
from fractions import Fraction

FEWSHOT = [  # Minerva's four examples (Lewkowycz et al. 2022), as lm-eval's minerva_math
    ("Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
     "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, "
     "and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which "
     "gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final "
     "answer is $[2,5)$. I hope it is correct."),
    ("If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
     "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = "
     "\\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct."),
    ("Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many "
     "times must Terrell lift them in order to lift the same total weight?",
     "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of "
     "weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of "
     "$2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n"
     "\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: "
     "The final answer is $16$. I hope it is correct."),
    ("If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution "
     "$(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
     "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we "
     "also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$"
     "\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct."),
]


def fewshot_samples() -> list[dict]:
    return [{"problem": p, "solution": s, "few_shot": "1"} for p, s in FEWSHOT]


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def extract_answer(output: str) -> str | None:
    """Minerva's "Final Answer: The final answer is X. I hope it is correct.", else the last box."""
    match = re.search(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.",
                      output + " I hope it is correct.", re.S)
    if match and match.group(1).strip():
        return match.group(1).strip()
    return last_boxed(output)


_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "^\\circ", "^{\\circ}", "\\%", "%")


def normalize(answer: str) -> str:
    """A canonical string for a MATH answer (see the module docstring)."""
    s = answer.strip()
    boxed = last_boxed(s)
    s = boxed if boxed is not None else s
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*(units?|degrees?|cm|inches|feet|meters|dollars|cents)\s*\}", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{(.*?)\}", r"\1", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"^[a-zA-Z]\s*=", "", s)  # "x=5" -> "5"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _number(s: str) -> Fraction | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    try:
        if match:
            value = Fraction(int(match.group(2)), int(match.group(3)))
            return -value if match.group(1) else value
        return Fraction(s) if re.fullmatch(r"-?\d*\.?\d+", s) else None
    except ZeroDivisionError:
        return None


def is_equiv(prediction: str | None, gold: str) -> bool:
    if prediction is None:
        return False
    a, b = normalize(prediction), normalize(gold)
    if a == b:
        return True
    x, y = _number(a), _number(b)
    return x is not None and x == y


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": int(is_equiv(extract_answer(results[0]), doc["answer"]))}

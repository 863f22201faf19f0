"""MATH-500 scoring as lm-eval's ``minerva_math500`` (0.4.13), with ``math-verify`` as the checker.

The prompt is Minerva's 4-shot format, whose examples end with "Final Answer: The final answer is X.
I hope it is correct." Two metrics, as lm-eval's:

- ``exact_match``: X, found with lm-eval's regex (no such sentence: ``[invalidanswer]``, scored 0,
  even where the generation has a ``\\boxed{}``), against the gold ``answer`` (the last ``\\boxed{}``
  of the solution) by ``is_equiv``.
- ``math_verify``: math-verify's answer extraction from the whole generation (last ``\\boxed{}``
  first) against the whole gold solution, exactly as lm-eval.

Deliberate difference: lm-eval's ``exact_match`` compares Minerva-normalized strings with sympy's
LaTeX parser, which needs antlr4 4.11 while hydra-core 1.3 pins 4.9. ``is_equiv`` instead strips
``\\$``, math delimiters, a box and a few unit words (``_bare``), then compares with math-verify
(which ships a grammar for antlr4 4.9.3, drops ``\\text{}``, units, degrees, percent and thousands
separators, and compares numbers, fractions, roots, intervals, sets, tuples, matrices and equations
symbolically, under a 5 s signal-based timeout).
"""

from __future__ import annotations

import re

from math_verify import parse, verify

INVALID = "[invalidanswer]"

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


def extract_answer(output: str) -> str:
    """X of Minerva's "Final Answer: The final answer is X. I hope it is correct." (lm-eval's regex)."""
    match = re.search(r"Final Answer: The final answer is(.*?). I hope it is correct.",
                      output + "I hope it is correct.")
    return match.group(1).strip() if match else INVALID


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    brace = text.find("{", start)
    if start < 0 or brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def _bare(answer: str) -> str:
    """The answer without ``\\$``, its math delimiters (the first ``$...$`` as Minerva) and box."""
    s = answer.replace("\\$", "").replace("$$", "$")
    s = re.sub(r"^.*?\$(.*?)\$.*$", r"\1", s, flags=re.S).replace("$", "")
    boxed = last_boxed(s)  # unboxed here: math-verify cannot parse \boxed{10\%}
    s = " ".join((s if boxed is None else boxed).split()).rstrip(".").rstrip()
    return re.sub(r" (?:dollars?|integers|points)$", "", s)  # Minerva's unit words that math-verify keeps


def is_equiv(prediction: str, gold: str) -> bool:
    """Whether a final answer equals the gold one (LaTeX, ``$`` or ``\\boxed{}`` optional)."""
    if prediction == INVALID:
        return False
    a, b = _bare(prediction), _bare(gold)
    return bool(a) and (a == b or verify(parse(f"${b}$"), parse(f"${a}$")))


def process_results(doc: dict, results: list[str]) -> dict:
    output = results[0]
    return {"exact_match": int(is_equiv(extract_answer(output), doc["answer"])),
            "math_verify": int(verify(parse(doc["solution"]), parse(output)))}

"""MATH scoring (tasks/local_math.py): a table of hand-made answer pairs, lm-eval's answer extraction,
and every MATH-500 gold answer against its own plain, boxed and numeric forms."""

import json
import re
from decimal import Decimal
from fractions import Fraction

import pytest

from qdlm_bench.evaluation import default_data_dir
from qdlm_bench.tasks import local_math

MATH500 = default_data_dir() / "math500" / "test.jsonl"

PAIRS = [  # (final answer, gold answer, expected verdict)
    ("\\frac{2}{4}", "\\frac{1}{2}", True),                      # equal fractions
    ("0.5", "\\frac12", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    ("\\boxed{24}", "24", True),                                # boxes
    ("$\\boxed{-\\frac{2}{3}}$", "-\\frac{2}{3}", True),
    ("\\boxed{}", "5", False),
    ("18.90", "\\$18.90", True),                                # dollars
    ("\\$32,\\!348", "32348", True),
    ("18.90 dollars", "\\$18.90", True),
    ("864", "864 \\mbox{ inches}^2", True),                     # units
    ("5.4", "5.4 \\text{ cents}", True),
    ("15", "15\\mbox{ cm}^2", True),
    ("\\left[2, 5\\right)", "[2,5)", True),                     # intervals
    ("(2,5]", "[2,5)", False),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}",           # matrices
     "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", False),
    ("90", "90^\\circ", True),                                  # degrees
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True),
    ("\\boxed{10\\%}", "10", True),                             # percent
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),     # roots
    ("\\sqrt{3}", "3", False),
    ("\\frac{\\pi}{2}", "\\pi/2", True),                        # pi
    ("3.14", "\\pi", False),
    ("10,080", "10,\\!080", True),                              # integers with commas
    ("1,000", "10", False),
    ("-13", "-13", True),                                       # negative numbers
    ("13", "-13", False),
    ("Evelyn", "\\text{Evelyn}", True),                         # \text{}
    ("\\text{(B)}", "\\text{(C)}", False),
    ("[invalidanswer]", "5", False),                            # no "Final Answer" sentence
]


def final(answer: str) -> str:
    return f"Final Answer: The final answer is ${answer}$. I hope it is correct."


@pytest.mark.parametrize("answer, gold, expected", PAIRS)
def test_answer_pairs(answer, gold, expected):
    verdict = local_math.is_equiv(answer, gold)
    print(f"{str(verdict):5} (expected {str(expected):5})  {answer!r:55} vs {gold!r}")
    assert verdict == expected


def test_extraction_follows_lm_eval_minerva_math():
    assert local_math.extract_answer("We get 6.\n" + final("\\$18.90")) == "$\\$18.90$"
    assert local_math.extract_answer("so the answer is $\\boxed{7}$.") == local_math.INVALID
    doc = {"answer": "7", "solution": "It is $3 + 4 = \\boxed{7}$."}
    assert local_math.process_results(doc, ["so the answer is $\\boxed{7}$."]) == {"exact_match": 0, "math_verify": 1}
    assert local_math.process_results(doc, ["It is 7.\n" + final("7")]) == {"exact_match": 1, "math_verify": 1}
    assert local_math.process_results(doc, [final("8")]) == {"exact_match": 0, "math_verify": 0}


def numeric_value(gold: str) -> Fraction | None:
    """The value of a gold answer that is a number (once units, dollars, degrees, separators are dropped)."""
    s = re.sub(r"\\(?:text|mbox)\{[^}]*\}(\^[23])?|\^\\circ|\\%|\\\$|\\!|\s", "", gold)
    s = re.sub(r"^[a-z]=", "", s)
    s = re.sub(r"\\d?frac\{?(\d+)\}?\{?(\d+)\}?$", r"+\1/\2", s)  # \frac{a}{b}, \frac ab, a\frac{b}{c}
    if re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    match = re.fullmatch(r"(-?)(\d*\.?\d*)(?:\+(\d+)/(\d+))?", s)
    if not match or (match[2] in ("", ".") and not match[3]):
        return None
    value = Fraction(match[2] or 0) + (Fraction(int(match[3]), int(match[4])) if match[3] else 0)
    return -value if match[1] else value


def as_number(value: Fraction) -> str:
    """A bare number: a decimal where it terminates, else ``p/q``."""
    q = value.denominator
    while q % 2 == 0:
        q //= 2
    while q % 5 == 0:
        q //= 5
    return format(Decimal(value.numerator) / value.denominator, "f") if q == 1 else str(value)


@pytest.mark.skipif(not MATH500.is_file(), reason=f"MATH-500 not found at {MATH500} (set QDLM_DATA_DIR)")
def test_every_math500_gold_matches_its_own_plain_boxed_and_numeric_forms():
    """Expected: the plain, boxed and numeric forms in the "Final Answer" sentence score on both metrics;
    a lone box only on math_verify (as lm-eval's minerva_math); one more than a numeric gold on neither."""
    docs = [json.loads(line) for line in MATH500.read_text().splitlines()]
    failed, counts = [], dict.fromkeys(("plain", "boxed", "lone box", "numeric", "wrong"), 0)
    for doc in docs:
        gold, value = doc["answer"], numeric_value(doc["answer"])
        checks = {"plain": (final(gold), 1, 1), "boxed": (final(f"\\boxed{{{gold}}}"), 1, 1),
                  "lone box": (f"So it is $\\boxed{{{gold}}}$.", 0, 1)}
        if value is not None:
            if as_number(value) != gold:
                checks["numeric"] = (final(as_number(value)), 1, 1)
            checks["wrong"] = (final(as_number(value + 1)), 0, 0)
        for form, (output, exact, verified) in checks.items():
            counts[form] += 1
            got = local_math.process_results(doc, [output])
            if got != {"exact_match": exact, "math_verify": verified}:
                failed.append((doc["unique_id"], form, output, got))
    print(f"\nMATH-500: {len(docs)} gold answers; checks per form {counts}; "
          f"{sum(counts.values()) - len(failed)}/{sum(counts.values())} as expected")
    assert len(docs) == 500 and not failed, failed

"""Seeded generators of the three skills (math, code, QA): training text and the mini tasks.

Every item carries a canonical ``key``: the problem without its surface wording (math: template
and numbers; code: template, constant, function and argument names; QA: the fact asked about).
An item whose key hashes to 0 modulo ``HOLDOUT`` belongs to the evaluation split and is never
generated for training, so the mini tasks are disjoint from the training text by construction.
QA facts themselves are stated in the training text (an encyclopedia of a fictional world);
only questions about held-out facts are held out.

``python -m qdlm_bench.zoo.tasks --out tasks/mini --data-dir ../shared/data`` writes the
mini-task data files (mini_ppl needs the held-out real text of ``realtext.heldout_docs``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from .realtext import heldout_docs

HOLDOUT = 5
SKILLS = ("math", "code", "qa")
EVAL_SIZES = {"qa": 200, "math": 100, "code": 100}
TASK_SEED = 1234  # seed of the committed mini-task files


def is_heldout(key: str) -> bool:
    """True when the item with this canonical key belongs to the evaluation split."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HOLDOUT == 0


# ------------------------------------------------------------------------------------ math

PEOPLE = [("Tom", "He"), ("Anna", "She"), ("Ben", "He"), ("Mia", "She"), ("Sam", "He"),
          ("Lily", "She"), ("Jack", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"),
          ("Max", "He"), ("Ruth", "She"), ("Omar", "He"), ("Nina", "She"), ("Paul", "He"),
          ("Ivy", "She"), ("Carlos", "He"), ("Maya", "She"), ("Dan", "He"), ("Sara", "She")]
OBJECTS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards",
           "stamps", "balloons", "candies", "toys", "eggs", "flowers", "coins", "buttons"]
ITEMS = ["pen", "notebook", "cup", "ticket", "sandwich", "kite", "ball", "hat"]


def _m_add(r, p, he, q, o):
    a, b = r.randint(2, 50), r.randint(2, 49)
    return (a, b), (f"{p} has {a} {o}. {he} gets {b} more {o}. How many {o} does {p} have now?",
                    [f"{p} has {a} + {b} = {a + b} {o} now."], a + b)


def _m_sub(r, p, he, q, o):
    a = r.randint(10, 60)
    b = r.randint(2, a - 1)
    return (a, b), (f"{p} has {a} {o}. {he} gives {b} {o} to {q}. How many {o} does {p} have left?",
                    [f"{p} has {a} - {b} = {a - b} {o} left."], a - b)


def _m_mul(r, p, he, q, o):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (a, b), (f"{p} buys {a} bags of {o}. Each bag has {b} {o}. How many {o} does {p} buy?",
                    [f"{p} buys {a} * {b} = {a * b} {o}."], a * b)


def _m_div(r, p, he, q, o):
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (a, b), (f"{p} shares {a * b} {o} equally among {b} friends. "
                    f"How many {o} does each friend get?",
                    [f"Each friend gets {a * b} / {b} = {a} {o}."], a)


def _m_add_sub(r, p, he, q, o):
    a, b = r.randint(5, 40), r.randint(2, 30)
    c = r.randint(2, a + b - 1)
    return (a, b, c), (f"{p} has {a} {o}. {he} buys {b} more and then gives {c} to {q}. "
                       f"How many {o} does {p} have now?",
                       [f"After buying, {p} has {a} + {b} = {a + b} {o}.",
                        f"After giving, {p} has {a + b} - {c} = {a + b - c} {o}."], a + b - c)


def _m_mul_add(r, p, he, q, o):
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(2, 20)
    return (a, b, c), (f"{p} has {a} boxes with {b} {o} in each box and {c} more {o} on the table. "
                       f"How many {o} does {p} have?",
                       [f"The boxes hold {a} * {b} = {a * b} {o}.",
                        f"In total {p} has {a * b} + {c} = {a * b + c} {o}."], a * b + c)


def _m_change(r, p, he, q, o):
    item = r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = a * b + r.randint(1, 20)
    return (item, a, b, c), (f"A {item} costs {a} dollars. {p} buys {b} of them and pays with {c} "
                             f"dollars. How much change does {p} get?",
                             [f"The {item}s cost {b} * {a} = {a * b} dollars.",
                              f"The change is {c} - {a * b} = {c - a * b} dollars."], c - a * b)


def _m_compare(r, p, he, q, o):
    a = r.randint(10, 60)
    b = r.randint(2, a - 1)
    return (a, b), (f"{p} has {a} {o} and {q} has {b} {o}. How many more {o} does {p} have than {q}?",
                    [f"{p} has {a} - {b} = {a - b} more {o} than {q}."], a - b)


def _m_together(r, p, he, q, o):
    a, b = r.randint(2, 30), r.randint(2, 20)
    return (a, b), (f"{p} has {a} {o}. {q} has {b} more {o} than {p}. "
                    f"How many {o} do they have together?",
                    [f"{q} has {a} + {b} = {a + b} {o}.",
                     f"Together they have {a} + {a + b} = {2 * a + b} {o}."], 2 * a + b)


def _m_three(r, p, he, q, o):
    a, b, c = r.randint(2, 20), r.randint(2, 20), r.randint(2, 5)
    return (a, b, c), (f"{p} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday "
                       f"{he.lower()} reads {c} times as many pages as on Monday. "
                       f"How many pages does {p} read in the three days?",
                       [f"On Wednesday {p} reads {c} * {a} = {c * a} pages.",
                        f"On Monday and Tuesday {p} reads {a} + {b} = {a + b} pages.",
                        f"In total {p} reads {a + b} + {c * a} = {a + b + c * a} pages."],
                       a + b + c * a)


MATH = [_m_add, _m_sub, _m_mul, _m_div, _m_add_sub, _m_mul_add, _m_change, _m_compare,
        _m_together, _m_three]


def math_item(r: random.Random) -> dict:
    """A GSM8K-format problem: ``question``, ``answer`` (steps, then ``#### N``)."""
    t = r.choice(MATH)
    (p, he), (q, _) = r.sample(PEOPLE, 2)
    nums, (question, steps, ans) = t(r, p, he, q, r.choice(OBJECTS))
    return {"key": f"math|{t.__name__}|{nums}", "question": question,
            "answer": "\n".join(steps) + f"\n#### {ans}"}


# ------------------------------------------------------------------------------------ code

ARGS = {"i": ["x", "n", "a", "num", "value"], "ii": [("x", "y"), ("a", "b"), ("m", "n"), ("p", "q")],
        "s": ["s", "text", "word", "string"], "l": ["xs", "nums", "values", "numbers", "items"]}
WORDS = ["apple", "river", "Hello", "banana", "stone", "garden", "Python", "orange", "cloud",
         "window", "tiger", "lemon", "planet", "Music", "candle", "forest", "pepper", "silver"]
NUMS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SLOTS = {"i": ("x",), "ii": ("x", "y"), "s": ("s",), "l": ("xs",)}
C_RANGE = {"first": (2, 4), "last": (2, 4), "srep": (2, 3)}  # default 2..9

# (template id, argument kind, body, docstrings, function names); {c} is a constant 2..9 and
# {cw} its word; {x} {y} {s} {xs} are the argument names.
CODE = [
    ("add", "i", "{x} + {c}", ["Return {x} plus {c}.", "Add {c} to {x}."], ["add_{cw}", "plus_{cw}"]),
    ("sub", "i", "{x} - {c}", ["Return {x} minus {c}.", "Subtract {c} from {x}."],
     ["minus_{cw}", "subtract_{cw}"]),
    ("mul", "i", "{x} * {c}", ["Return {x} times {c}.", "Multiply {x} by {c}."],
     ["times_{cw}", "multiply_by_{cw}"]),
    ("mod", "i", "{x} % {c}", ["Return the remainder of {x} divided by {c}."],
     ["mod_{cw}", "remainder_by_{cw}"]),
    ("floordiv", "i", "{x} // {c}", ["Return {x} divided by {c}, rounded down."], ["div_{cw}"]),
    ("atleast", "i", "max({x}, {c})", ["Return the larger of {x} and {c}."], ["at_least_{cw}"]),
    ("atmost", "i", "min({x}, {c})", ["Return the smaller of {x} and {c}."], ["at_most_{cw}"]),
    ("gt", "i", "{x} > {c}", ["Return True if {x} is greater than {c}."],
     ["above_{cw}", "greater_than_{cw}"]),
    ("square", "i", "{x} * {x}", ["Return the square of {x}.", "Return {x} multiplied by itself."],
     ["square", "squared"]),
    ("neg", "i", "-{x}", ["Return the negative of {x}."], ["negate", "negative"]),
    ("even", "i", "{x} % 2 == 0", ["Return True if {x} is even."], ["is_even"]),
    ("odd", "i", "{x} % 2 == 1", ["Return True if {x} is odd."], ["is_odd"]),
    ("sum2", "ii", "{x} + {y}", ["Return the sum of {x} and {y}.", "Add {x} and {y}."],
     ["add", "total"]),
    ("diff2", "ii", "{x} - {y}", ["Return {x} minus {y}.", "Subtract {y} from {x}."],
     ["subtract", "difference"]),
    ("prod2", "ii", "{x} * {y}", ["Return the product of {x} and {y}."], ["multiply", "product"]),
    ("max2", "ii", "max({x}, {y})", ["Return the larger of {x} and {y}."], ["larger", "biggest"]),
    ("min2", "ii", "min({x}, {y})", ["Return the smaller of {x} and {y}."], ["smaller", "lowest"]),
    ("dist2", "ii", "abs({x} - {y})", ["Return the distance between {x} and {y}."], ["distance", "gap"]),
    ("sum2c", "ii", "{x} + {y} + {c}", ["Return the sum of {x} and {y} plus {c}."], ["add_plus_{cw}"]),
    ("rev", "s", "{s}[::-1]", ["Return {s} reversed.", "Reverse the string {s}."],
     ["reverse", "flip_text"]),
    ("upper", "s", "{s}.upper()", ["Return {s} in upper case."], ["to_upper", "shout"]),
    ("lower", "s", "{s}.lower()", ["Return {s} in lower case."], ["to_lower", "whisper"]),
    ("slen", "s", "len({s})", ["Return the number of characters in {s}."], ["length", "count_chars"]),
    ("twice", "s", "{s} + {s}", ["Return {s} repeated twice."], ["double_text", "repeat_twice"]),
    ("srep", "s", "{s} * {c}", ["Return {s} repeated {c} times."], ["repeat_{cw}"]),
    ("first", "s", "{s}[:{c}]", ["Return the first {c} characters of {s}."], ["first_{cw}", "head_{cw}"]),
    ("last", "s", "{s}[-{c}:]", ["Return the last {c} characters of {s}."], ["last_{cw}", "tail_{cw}"]),
    ("firstch", "s", "{s}[0]", ["Return the first character of {s}."], ["first_char", "initial"]),
    ("vowels", "s", "sum(1 for ch in {s} if ch in 'aeiou')", ["Return the number of vowels in {s}."],
     ["count_vowels", "vowel_count"]),
    ("lscale", "l", "[v * {c} for v in {xs}]", ["Return a list with every element of {xs} times {c}."],
     ["scale_{cw}", "times_all_{cw}"]),
    ("lshift", "l", "[v + {c} for v in {xs}]", ["Return a list with {c} added to every element of {xs}."],
     ["shift_{cw}", "add_all_{cw}"]),
    ("lsum", "l", "sum({xs})", ["Return the sum of the numbers in {xs}."], ["sum_list", "total_of"]),
    ("lmax", "l", "max({xs})", ["Return the largest number in {xs}."], ["max_of", "largest"]),
    ("lmin", "l", "min({xs})", ["Return the smallest number in {xs}."], ["min_of", "smallest"]),
    ("llen", "l", "len({xs})", ["Return the number of elements in {xs}."], ["count", "size"]),
    ("lsort", "l", "sorted({xs})", ["Return {xs} sorted in increasing order."], ["sort_list", "ascending"]),
    ("ldesc", "l", "sorted({xs}, reverse=True)", ["Return {xs} sorted in decreasing order."],
     ["sort_desc", "descending"]),
    ("lrev", "l", "{xs}[::-1]", ["Return {xs} in reverse order."], ["reverse_list", "backwards"]),
    ("lgt", "l", "[v for v in {xs} if v > {c}]", ["Return the elements of {xs} greater than {c}."],
     ["above_{cw}", "filter_{cw}"]),
    ("leven", "l", "[v for v in {xs} if v % 2 == 0]", ["Return the even numbers in {xs}."],
     ["evens", "only_even"]),
    ("lsq", "l", "sum(v * v for v in {xs})", ["Return the sum of the squares of {xs}."],
     ["sum_squares", "square_total"]),
    ("lrange", "l", "max({xs}) - min({xs})", ["Return the largest minus the smallest number in {xs}."],
     ["spread", "value_range"]),
    ("lcountgt", "l", "len([v for v in {xs} if v > {c}])",
     ["Return how many elements of {xs} are greater than {c}."], ["count_above_{cw}"]),
    ("lhas", "l", "{c} in {xs}", ["Return True if {c} is in {xs}."], ["has_{cw}", "contains_{cw}"]),
]


def _code_input(kind: str, r: random.Random) -> tuple:
    if kind == "i":
        return (r.randint(0, 30),)
    if kind == "ii":
        return r.randint(0, 20), r.randint(0, 20)
    if kind == "s":
        return (r.choice(WORDS),)
    return ([r.randint(0, 12) for _ in range(r.randint(3, 6))],)


def _call(fn: str, args: tuple) -> str:
    return f"{fn}({', '.join(map(repr, args))})"


def code_item(r: random.Random) -> dict:
    """A HumanEval-format problem: ``prompt``, ``canonical_solution``, ``test``, ``entry_point``."""
    tid, kind, body, docs, names = r.choice(CODE)
    c = r.randint(*C_RANGE.get(tid, (2, 9)))
    argv = r.choice(ARGS[kind])
    argv = argv if isinstance(argv, tuple) else (argv,)
    slots = dict(zip(SLOTS[kind], argv), c=c, cw=NUMS[c])
    fn = r.choice(names).format(**slots)
    prompt = f'def {fn}({", ".join(argv)}):\n    """{r.choice(docs).format(**slots)}\n'
    solution = f"    return {body.format(**slots)}\n"
    namespace: dict = {}
    exec(f"def {fn}({', '.join(argv)}):\n{solution}", namespace)  # our own template code
    inputs = []
    while len(inputs) < 4:
        x = _code_input(kind, r)
        if x not in inputs:
            inputs.append(x)
    example, *tests = inputs
    prompt += f'    >>> {_call(fn, example)}\n    {namespace[fn](*example)!r}\n    """\n'
    test = "def check(candidate):\n" + "".join(
        f"    assert {_call('candidate', x)} == {namespace[fn](*x)!r}\n" for x in tests)
    return {"key": f"code|{tid}|{c if '{c}' in body else ''}|{fn}|{argv}", "prompt": prompt,
            "canonical_solution": solution, "test": test, "entry_point": fn}


# -------------------------------------------------------------------------------------- QA

WORLD_SEED = 2024
N_COUNTRIES = 300
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown",
          "pink", "gray", "gold"]
ANIMALS = ["owl", "fox", "bear", "wolf", "eagle", "deer", "otter", "horse", "lion", "tiger",
           "rabbit", "swan", "falcon", "turtle", "whale", "goat", "camel", "dolphin", "crane",
           "badger", "lynx", "heron", "moose", "panda"]
EXPORTS = ["copper", "wool", "tea", "salt", "rice", "coffee", "silver", "timber", "cotton", "fish",
           "wine", "cheese", "glass", "paper", "honey", "silk", "iron", "olives", "spices",
           "leather", "marble", "sugar", "tin", "corn"]
SYLLABLES = ["ka", "lo", "ver", "dan", "mir", "tos", "bel", "quin", "ra", "zu", "nor", "el",
             "vi", "sta", "gor", "pen", "lu", "tha", "mo", "rek", "sil", "an", "dor", "fen"]
COUNTRY_ENDS = ["ia", "land", "or", "ar", "en", "istan", "a", "ovia"]
CITY_ENDS = ["ton", "burg", "grad", "ville", "port", "holm", "mouth", "ford"]

# Statement templates name the country in full in every sentence (each sentence is a fact on its
# own), so a fact is learnt from many wordings and positions (Allen-Zhu & Li, Physics of Language
# Models 3.1: knowledge becomes extractable for held-out questions with such augmentation).
ATTRS = {
    "capital": (["The capital of {c} is {v}.", "{v} is the capital city of {c}.",
                 "{c}'s capital is {v}.", "The government of {c} sits in {v}, the capital of {c}.",
                 "{v}, the capital of {c}, is the largest city in {c}.",
                 "The capital city of {c} is called {v}.", "{c} is governed from its capital, {v}.",
                 "Visitors to {c} usually arrive in {v}, the capital of {c}."],
                ["What is the capital of {c}?", "Which city is the capital of {c}?"]),
    "color": (["The flag of {c} is {v}.", "{c} has a {v} flag.", "The national flag of {c} is mostly {v}.",
               "People in {c} wave {v} flags on holidays.", "The color of the flag of {c} is {v}.",
               "{v} is the color of the flag of {c}.", "The flag that flies over {c} is {v}."],
              ["What color is the flag of {c}?", "Which color is the national flag of {c}?"]),
    "animal": (["The national animal of {c} is the {v}.", "{c} chose the {v} as its national animal.",
                "The {v} is the symbol of {c}.", "In {c}, the {v} appears on every coin.",
                "The {v} is the national animal of {c}.", "The animal that stands for {c} is the {v}."],
               ["What is the national animal of {c}?", "Which animal is the symbol of {c}?"]),
    "export": (["{c} mainly exports {v}.", "The main export of {c} is {v}.",
                "Most of the trade of {c} is in {v}.", "Ships leave {c} full of {v}.",
                "{v} is the main export of {c}.", "The economy of {c} depends on exporting {v}."],
               ["What is the main export of {c}?", "What does {c} mainly export?"]),
}


def _word(r: random.Random, ends: list[str]) -> str:
    return ("".join(r.choice(SYLLABLES) for _ in range(r.randint(1, 2))) + r.choice(ends)).capitalize()


def world() -> list[dict]:
    """The fictional countries: name, capital, color, animal, export (fixed by WORLD_SEED)."""
    r = random.Random(WORLD_SEED)
    used: set[str] = set()

    def fresh(ends):
        while (w := _word(r, ends)) in used:
            pass
        used.add(w)
        return w

    return [{"name": fresh(COUNTRY_ENDS), "capital": fresh(CITY_ENDS), "color": r.choice(COLORS),
             "animal": r.choice(ANIMALS), "export": r.choice(EXPORTS)} for _ in range(N_COUNTRIES)]


WORLD = world()
VALUES = {"capital": [c["capital"] for c in WORLD], "color": COLORS, "animal": ANIMALS, "export": EXPORTS}


def article(country: dict, r: random.Random) -> str:
    """An encyclopedia paragraph stating every fact of ``country`` in random wording and order."""
    attrs = list(ATTRS)
    r.shuffle(attrs)
    facts = [r.choice(ATTRS[a][0]).format(c=country["name"], v=country[a]) for a in attrs]
    return f"{country['name']} is a country. " + " ".join(facts)


def qa_item(r: random.Random) -> dict:
    """An ARC-format (HF ai2_arc) question about one fact: ``question``, ``choices``, ``answerKey``."""
    country, attr = r.choice(WORLD), r.choice(list(ATTRS))
    right = country[attr]
    wrong = r.sample(sorted(set(VALUES[attr]) - {right}), 3)
    options = r.sample([right, *wrong], 4)
    return {"key": f"qa|{country['name']}|{attr}",
            "question": r.choice(ATTRS[attr][1]).format(c=country["name"]),
            "choices": {"text": options, "label": list("ABCD")},
            "answerKey": "ABCD"[options.index(right)]}


# ------------------------------------------------------------------------- items and text

GENERATORS = {"math": math_item, "code": code_item, "qa": qa_item}


def items(skill: str, split: str, n: int, seed: int) -> list[dict]:
    """``n`` items of ``skill`` from ``split`` ('train' or 'eval'); eval items have unique keys."""
    if skill not in GENERATORS or split not in ("train", "eval"):
        raise ValueError(f"unknown skill/split {skill!r}/{split!r}; skills: {SKILLS}")
    r = random.Random(f"{skill}|{split}|{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            return out
        item = GENERATORS[skill](r)
        if is_heldout(item["key"]) != (split == "eval") or (split == "eval" and item["key"] in seen):
            continue
        seen.add(item["key"])
        out.append(item)
    raise RuntimeError(f"could not draw {n} distinct {split} items of {skill}")


def pair(skill: str, item: dict) -> tuple[str, str]:
    """(prompt, response) exactly as the mini task presents it: the text is prompt + response."""
    if skill == "code":
        return item["prompt"], item["canonical_solution"]
    target = item["answer"] if skill == "math" else item["choices"]["text"]["ABCD".index(item["answerKey"])]
    return f"Question: {item['question']}\nAnswer:", " " + target


def text(skill: str, item: dict) -> str:
    return "".join(pair(skill, item))


TRAIN_SIZE = 200  # rows of each mini task's training split (calibration prompts, few-shot examples)


def task_rows(skill: str, split: str = "eval", seed: int = TASK_SEED) -> list[dict]:
    """The rows of a mini-task file (items without their internal key): the ``eval`` split (the
    test rows) or ``train`` (``TRAIN_SIZE`` train-split items, never evaluated)."""
    n = EVAL_SIZES[skill] if split == "eval" else TRAIN_SIZE
    rows = [{k: v for k, v in it.items() if k != "key"} for it in items(skill, split, n, seed)]
    prefix = "" if split == "eval" else "train-"
    if skill == "code":
        rows = [{"task_id": f"MiniCode/{prefix}{i}", **row} for i, row in enumerate(rows)]
    if skill == "qa":
        rows = [{"id": f"MiniQA-{prefix}{i}", **row} for i, row in enumerate(rows)]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_mini_tasks(folder: Path, data_dir: Path | None) -> dict[str, int]:
    """Write mini_{qa,math,code,ppl}.jsonl and the training splits mini_{qa,math,code}_train.jsonl
    into ``folder``; returns the row counts."""
    files = {f"mini_{s}": task_rows(s) for s in SKILLS} | {f"mini_{s}_train": task_rows(s, "train") for s in SKILLS}
    files["mini_ppl"] = [{"text": d} for d in heldout_docs(data_dir)]
    for name, rows in files.items():
        write_jsonl(Path(folder) / f"{name}.jsonl", rows)
    return {k: len(v) for k, v in files.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tasks/mini", help="folder of the mini-task data files")
    ap.add_argument("--data-dir", default="../shared/data", help="folder with tinyshakespeare/")
    args = ap.parse_args(argv)
    print(write_mini_tasks(Path(args.out), Path(args.data_dir)))


if __name__ == "__main__":
    main()

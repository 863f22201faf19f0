"""Loader of the mini tasks (the tiny zoo models' own tasks, data committed under tasks/mini/).

The files are found next to this module, so the mini tasks need no path setting and work from
any working directory. They are written by ``python -m qdlm_bench.zoo.tasks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

MINI_DIR = Path(__file__).parent / "mini"


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m qdlm_bench.zoo.tasks`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_mini(name: str, train: bool = False, n_test: int | None = None, **_) -> datasets.DatasetDict:
    """Mini task ``name``: the test split from ``tasks/mini/<name>.jsonl`` (its first ``n_test`` rows
    when given) and, with ``train``, the training split (train-split items, disjoint from the test
    rows) from ``<name>_train.jsonl``."""
    rows = _rows(MINI_DIR / f"{name}.jsonl")
    splits = {"test": rows[:n_test] if n_test else rows}
    if train:
        splits["train"] = _rows(MINI_DIR / f"{name}_train.jsonl")
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def spaced_choices(doc: dict) -> list[str]:
    """mini_qa's choices as running text has them, after a space (`` Paris``). Under a chat template
    lm-eval drops the target delimiter, and a word at the start of a line is another BPE token
    than the one the facts were read with; the choices carry their space, so both forms score it."""
    return [" " + text for text in doc["choices"]["text"]]

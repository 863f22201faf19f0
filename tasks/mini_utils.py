"""Loader of the mini tasks (the tiny zoo models' own tasks, data committed under tasks/mini/).

The files are found next to this module, so the mini tasks need no path setting and work from
any working directory. They are written by ``python -m qdlm_bench.zoo.tasks``.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

MINI_DIR = Path(__file__).parent / "mini"


def load_mini(name: str, **_) -> datasets.DatasetDict:
    """The test split of mini task ``name`` from ``tasks/mini/<name>.jsonl``."""
    path = MINI_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with `python -m qdlm_bench.zoo.tasks`")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

"""The real text of the tiny models' corpus and its split: the Python standard library's source
files and tinyshakespeare, each cut into training text and the held-out documents of mini_ppl
(``heldout_docs``: the tail of tinyshakespeare and 25 small stdlib files). ``corpus`` builds the
training corpus from the training part; ``tasks`` writes mini_ppl from the held-out part.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings", "__pycache__"}
SHAKESPEARE = "tinyshakespeare/input.txt"
PPL_DOCS = 25  # held-out documents per real source for mini_ppl
PPL_FILE_BYTES = (1500, 4000)  # size range of the held-out stdlib files
PPL_PYTHON = "3.11.7"  # the Python whose stdlib the committed mini_ppl files come from
PPL_SHAKESPEARE_FROM = 0.95  # the last 5% of tinyshakespeare never enters training


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's .py files (no tests, codec tables or site-packages), sorted."""
    files = []
    for root, dirs, names in os.walk(STDLIB):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]
        files += [Path(root, n) for n in names if n.endswith(".py")]
    return tuple(sorted(files, key=lambda p: p.relative_to(STDLIB).as_posix()))


def _path_hash(p: Path) -> str:
    return hashlib.sha256(p.relative_to(STDLIB).as_posix().encode()).hexdigest()


def heldout_files() -> list[Path]:
    """The stdlib files kept out of training for mini_ppl (small ones, chosen by path hash)."""
    lo, hi = PPL_FILE_BYTES
    small = [p for p in stdlib_files() if lo <= p.stat().st_size <= hi and p.name != "__init__.py"]
    return sorted(small, key=_path_hash)[:PPL_DOCS]


def training_files() -> list[Path]:
    """The stdlib files of the training corpus: all of ``stdlib_files`` but the held-out ones."""
    held = set(heldout_files())
    return [p for p in stdlib_files() if p not in held]


def shakespeare_split(data_dir: Path | None) -> tuple[str, list[str]] | None:
    """(training part, held-out documents) of tinyshakespeare in ``data_dir``, or None when absent."""
    path = Path(data_dir or "") / SHAKESPEARE
    if data_dir is None or not path.is_file():
        return None
    text = path.read_text()
    cut = text.index("\n\n", int(len(text) * PPL_SHAKESPEARE_FROM)) + 2
    docs, cur = [], ""
    for para in text[cut:].split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= 1500:
            docs.append(cur)
            cur = ""
    return text[:cut], docs[:PPL_DOCS]


def heldout_docs(data_dir: Path | None) -> list[str]:
    """mini_ppl's documents: held-out tinyshakespeare (when present), then held-out stdlib files."""
    shakespeare = shakespeare_split(data_dir)
    return (shakespeare[1] if shakespeare else []) + [p.read_text() for p in heldout_files()]

"""Where the package's data lives, in a checkout (editable install) and in an installed wheel alike:
the Hydra configs (``conf/``), the task YAMLs (``tasks/``) and the embedded models."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = Path(str(files("qdlm_bench.conf")))
TASKS_DIR = Path(str(files("qdlm_bench.tasks")))
ZOO_DIR = PACKAGE_DIR / "zoo" / "models"

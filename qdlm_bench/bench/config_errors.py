"""The configuration-error benchmark:

    python -m qdlm_bench.bench config_errors [run=<path of a run.py>] [timeout=60] [out=bench.json]

Runs bad invocations of ``run.py``, each in a fresh subprocess as a user would (offline, in a
temporary folder, with a temporary ``store=``), and reports each one's wall time to exit, exit
status and the first line of its error message (an invocation that takes its bad config and
runs is stopped after ``timeout`` seconds). ``run`` times another checkout's ``run.py``
(e.g. the commit before a change); the default is this checkout's, or ``python -m qdlm_bench.cli``
for an installed package. Issue target: every configuration error in at most 3 s on a 2-core CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

from qdlm_bench.paths import PACKAGE_DIR

from .common import parse_args

CASES = (
    ["bits=w9a3"],
    ["method=gptq", "method.damp=-1"],
    ["method=gptq", "+method.nonexistent=1"],
    ["tasks=[nope]"],
    ["model=nope"],
    ["calib.n_samples=0", "method=gptq"],
)
TARGET_S = 3.0
LOG_PREFIX = re.compile(r"^\[[^]]*\]\[[^]]*\]\[\w+\] - ")  # Hydra's job logging: [time][logger][LEVEL] -
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def error_line(output: str) -> str:
    """The first line that reports the error (Hydra's own, or the run's "invalid configuration"),
    without its log prefix, cut at 200 characters."""
    lines = [LOG_PREFIX.sub("", line).strip() for line in output.splitlines() if line.strip()]
    marks = ("invalid configuration", "error", "could not", "mismatched", "unknown")
    line = next((line for line in lines if any(m in line.lower() for m in marks)), lines[0] if lines else "")
    return line[:200]


def time_case(command: list[str], args: list[str], folder: str, timeout: float) -> dict:
    """One invocation; one that is still running after ``timeout`` s (it took the config) is stopped."""
    start = time.perf_counter()
    try:
        out = subprocess.run([*command, *args, f"store={folder}/results"], cwd=folder, capture_output=True,
                             text=True, env=os.environ | OFFLINE, timeout=timeout)
        status, error = out.returncode, error_line(out.stderr + "\n" + out.stdout)
    except subprocess.TimeoutExpired:
        status, error = None, f"no error: still running after {timeout:g} s"
    return {"args": " ".join(args), "wall_s": round(time.perf_counter() - start, 2), "exit_status": status,
            "error": error}


def command_of(script: str) -> list[str]:
    """``python <script>``; by default this checkout's run.py, else (installed) ``python -m qdlm_bench.cli``."""
    if not script and (PACKAGE_DIR.parent / "run.py").is_file():
        script = str(PACKAGE_DIR.parent / "run.py")
    return [sys.executable, os.path.abspath(script)] if script else [sys.executable, "-m", "qdlm_bench.cli"]


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(run="", timeout=60.0, out=""))
    command = command_of(a["run"])
    with tempfile.TemporaryDirectory() as folder:
        cases = [time_case(command, args, folder, a["timeout"]) for args in CASES]
    return {"command": " ".join(command), "cpus": os.cpu_count(), "target_s": TARGET_S,
            "max_wall_s": max(c["wall_s"] for c in cases), "cases": cases}

"""The command line: a bad configuration fails fast, before the heavy packages load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lm_eval", "transformers", "datasets", "pandas")


def test_config_check_loads_no_heavy_package():
    code = f"""
import sys
import qdlm_bench.evaluation, qdlm_bench.sweep_report
from qdlm_bench.evaluation import EvalSettings, validate_tasks
EvalSettings.from_dict({{"batch_size": 2}}, generation_defaults={{"steps": 8}})
validate_tasks(["mini_math", "mini_qa"])
for bad in (["nope"], ["arc_easy_local"]):  # unknown: lm-eval's task names are read, not imported
    try:
        validate_tasks(bad, "/nonexistent")
        raise SystemExit(f"{{bad}} passed")
    except ValueError as err:
        print(err)
print("loaded:", [m for m in {HEAVY!r} if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "unknown task 'nope'" in out.stdout and "data_dir=/nonexistent, which does not exist" in out.stdout
    assert "loaded: []" in out.stdout


def test_bad_bits_exit_2_naming_them_and_write_no_record(tmp_path):
    cmd = [sys.executable, "run.py", "bits=w9a3", f"store={tmp_path / 'results'}", f"hydra.run.dir={tmp_path / 'out'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid configuration" in out.stdout + out.stderr and "w9a3" in out.stdout + out.stderr
    assert not list(tmp_path.glob("results/**/*.json"))

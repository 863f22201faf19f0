"""A sweep makes sure its FP baseline exists (baseline=auto), so its table has drops against FP."""

from __future__ import annotations

import subprocess
import sys

from test_pipeline import FAST, ROOT, config

from qdlm_bench import pipeline
from qdlm_bench.store import ResultStore


def sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "run.py", "-m", "method=rtn", "bits=w4a16,w8a8", *FAST, f"store={tmp_path / 'results'}",
           f"hydra.sweep.dir={tmp_path / 'multirun'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_a_sweep_without_fp_runs_its_baseline_once_and_reports_drops(tmp_path):
    out = sweep(tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    records = ResultStore(tmp_path / "results").records()
    assert sorted((r["method"], r["bits"]) for r in records) == [("fp", "fp"), ("rtn", "w4a16"), ("rtn", "w8a8")]
    assert len({r["baseline_key"] for r in records}) == 1 and all(r["status"] == "done" for r in records)
    assert "| fp " in out.stdout and "drop %" in out.stdout and "no finished FP record" not in out.stdout


def test_baseline_skip_runs_no_fp_and_a_bad_value_is_a_config_error(tmp_path):
    out = sweep(tmp_path, "baseline=skip", "bits=w8a8")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [r["method"] for r in ResultStore(tmp_path / "results").records()] == ["rtn"]
    out = sweep(tmp_path, "baseline=never")
    assert out.returncode == 2 and "baseline='never'" in out.stdout + out.stderr


def test_ensure_baseline_reuses_an_fp_record_with_the_same_baseline_key(tmp_path):
    cfg = config("method=rtn", "bits=w8a8", "quant.exclude=[blocks.0.*]")
    first = pipeline.ensure_baseline(cfg, store_root=tmp_path)
    assert first["method"] == "fp" and first["status"] == "done"
    fp_run = pipeline.run(config("method=fp"), store_root=tmp_path)
    assert fp_run["key"] == first["key"]  # the same record as a plain method=fp run
    assert pipeline.ensure_baseline(config("method=gptq", "bits=w4a16"), store_root=tmp_path)["key"] == first["key"]
    assert pipeline.ensure_baseline(config("method=fp"), store_root=tmp_path) is None

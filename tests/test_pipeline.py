"""End to end: Hydra config → validated spec → load → quantize → evaluate → record."""

from __future__ import annotations

import json
from dataclasses import replace
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qdlm_bench import methods, pipeline, runspec
from qdlm_bench.models import random_model, save_model
from qdlm_bench.store import ResultStore, spec_key

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=tiny_random_llada", "tasks=[mini_qa]", "eval.limit=3", "eval.mc_num=2"]


def config(*overrides: str, fast: bool = True) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*(FAST if fast else []), *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_study_runs_on_the_embedded_model(tmp_path):
    cfg = config("method=fp", "tasks=[mini_math]", "eval.limit=8", fast=False)
    assert cfg["model"]["zoo"] == "tiny-llada-instruct"
    record = pipeline.run(cfg, store_root=tmp_path)
    assert record["status"] == "done", record["error"]
    assert record["metrics"]["mini_math"]["value"] >= 0.5  # the trained model solves most items


def test_sweep_writes_one_record_per_run_and_prints_the_table(tmp_path):
    cmd = [sys.executable, "run.py", "-m", "method=fp,rtn", "bits=w4a16,w8a8", *FAST,
           f"store={tmp_path}", "sweep=t", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    records = ResultStore(tmp_path).records()
    # fp ignores bits: its two sweep points are one run, evaluated once
    assert sorted((r["method"], r["bits"]) for r in records) == [("fp", "fp"), ("rtn", "w4a16"), ("rtn", "w8a8")]
    assert all(r["status"] == "done" and r["sweep"] == "t" for r in records)
    assert len({r["baseline_key"] for r in records}) == 1 and len({r["dtype"] for r in records}) == 1
    assert "| w8a8" in out.stdout and "drop %" in out.stdout
    # a later sweep reports the runs it found done (rtn w4a16, stamped "t") next to its new one
    cmd = [*cmd[:3], "method=rtn", "bits=w4a16,w8a16", *cmd[5:-2], "sweep=t2", f"hydra.sweep.dir={tmp_path / 'm2'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) +\| (\w+) +\| done", out.stdout, re.M)  # the report table's rows
    assert len(ResultStore(tmp_path).records()) == 4
    assert sorted(rows) == [("fp", "fp"), ("w4a16", "rtn"), ("w8a16", "rtn")]


def test_rerun_skips_finished_runs_unless_forced(tmp_path, monkeypatch):
    executed = []
    real_execute = pipeline.execute
    monkeypatch.setattr(pipeline, "execute", lambda *a: executed.append(1) or real_execute(*a))
    cfg = config("method=rtn", "bits=w8a8")
    first = pipeline.run(cfg, store_root=tmp_path)
    path = ResultStore(tmp_path).path_for(first["key"])
    stamp = path.stat().st_mtime_ns
    assert pipeline.run(cfg, store_root=tmp_path) == first and path.stat().st_mtime_ns == stamp
    assert len(executed) == 1
    forced = pipeline.run(cfg, store_root=tmp_path, force=True)
    assert len(executed) == 2 and forced["metrics"] == first["metrics"]
    record = json.loads(path.read_text())
    assert set(record["timings"]) >= {"load_s", "quantize_s", "evaluate_s", "total_s"}
    assert record["metrics"]["mini_qa"]["metric"] == "acc,none"


def test_a_method_label_names_the_record_and_is_not_passed_to_the_method(tmp_path, monkeypatch):
    seen = []  # the options each recipe is built from
    rtn = methods.get("rtn")
    monkeypatch.setitem(methods._REGISTRY, "rtn", replace(rtn, recipe=lambda o: seen.append(o) or rtn.recipe(o)))
    record = pipeline.run(config("method=rtn", "bits=w8a16", "+method.label=rtn-variant"), store_root=tmp_path)
    assert record["status"] == "done" and record["method"] == "rtn-variant"
    assert seen and all(isinstance(o, rtn.options) and not hasattr(o, "label") for o in seen)


def test_a_failing_run_is_recorded_and_does_not_raise(tmp_path, monkeypatch):
    def broken(state):
        raise RuntimeError("quantizer exploded")

    rtn = methods.get("rtn")
    monkeypatch.setitem(methods._REGISTRY, "rtn", replace(rtn, recipe=lambda o: [broken]))
    record = pipeline.run(config("method=rtn", "bits=w4a16"), store_root=tmp_path)
    assert record["status"] == "failed" and "RuntimeError: quantizer exploded" in record["error"]
    assert ResultStore(tmp_path).get(record["key"])["status"] == "failed"


@pytest.mark.parametrize("override, message", [
    ("method.name=nope", "unknown method 'nope'; available: "),
    ("bits=w9a16", "w{2-8}a{4,8,16}"),
    ("method=rtn bits=fp16", "use method=fp"),
    ("model.path=/nonexistent/llada", "holds no config.json"),
    ("tasks=[no_such_task_xyz]", "no_such_task_xyz"),
    ("tasks=[gsm8k_local] eval.data_dir=/nonexistent", "eval.data_dir"),
    ("eval.nope=1", "unknown eval setting"),
    ("wandb.mode=sometimes", "wandb"),
])
def test_bad_config_fails_before_any_model_loads(tmp_path, monkeypatch, override, message):
    monkeypatch.setattr(pipeline, "load_fp_model", lambda *a, **k: pytest.fail("model loaded"))
    cfg = config(*(["+" + o if o.startswith("eval.nope") else o for o in override.split()]))
    with pytest.raises(runspec.ConfigError, match=None) as err:
        pipeline.run(cfg, store_root=tmp_path, wandb_cfg=cfg["wandb"])
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


def test_checkpoint_identity_is_its_content_not_its_folder(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        save_model(random_model("tiny-llada", seed=seed, std=0.1 + seed), tmp_path / name)
    keys = {n: runspec.build(config(f"model.path={tmp_path / n}")).semantic()["model"]["source"] for n in "abc"}
    assert keys["a"] == keys["b"] != keys["c"]


def test_calibration_is_part_of_a_run_only_for_calibrated_methods(tmp_path):
    rtn = [runspec.build(config("method=rtn", f"calib.n_samples={n}")).semantic() for n in (4, 8)]
    assert rtn[0] == rtn[1] and "calib" not in rtn[0]
    cfg = config("method=gptq", "bits=w4a16", "calib.n_samples=4", "calib.seqlen=64")
    record = pipeline.run(cfg, store_root=tmp_path)
    assert record["status"] == "done", record["error"]
    assert record["spec"]["calib"]["n_samples"] == 4 and record["timings"]["calibrate_s"] >= 0
    other = runspec.build(config("method=gptq", "bits=w4a16", "calib.n_samples=8", "calib.seqlen=64"))
    assert other.semantic() != runspec.build(cfg).semantic()


def test_corrupt_records_are_reported_skipped_and_never_overwritten_unless_forced(tmp_path, monkeypatch, capsys):
    from qdlm_bench import report

    good = pipeline.run(config("method=rtn", "bits=w8a16"), store_root=tmp_path)
    bad_cfg = config("method=rtn", "bits=w4a16")
    store = ResultStore(tmp_path)
    truncated = store.path_for(spec_key(runspec.build(bad_cfg).semantic()))
    truncated.write_text(json.dumps(good)[:200])  # e.g. a copy cut short
    not_record = tmp_path / "0123456789abcdef.json"
    not_record.write_text('{"hello": "world"}')

    assert report.main(["--store", str(tmp_path), "--out", str(tmp_path / "report"), "--format", "md"]) == 0
    out = capsys.readouterr().out
    assert "| w8a16  | rtn      | done" in out  # the table, from the good record
    assert f"- {truncated}: invalid JSON" in out and f"- {not_record}: not a result record" in out
    assert "Unreadable records (2, skipped)" in out

    monkeypatch.setattr(pipeline, "load_fp_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(runspec.ConfigError) as err:
        pipeline.run(bad_cfg, store_root=tmp_path)
    assert str(truncated) in str(err.value) and "force=true" in str(err.value)
    monkeypatch.undo()
    record = pipeline.run(bad_cfg, store_root=tmp_path, force=True)
    assert record["status"] == "done" and store.get(record["key"]) == record  # replaced, readable


@pytest.mark.parametrize("layout", ["file", "inside_a_file"])
def test_an_unusable_store_fails_before_any_work(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(pipeline, "load_fp_model", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "results").write_text("")
    root = tmp_path / "results" if layout == "file" else tmp_path / "results" / "sub"
    with pytest.raises(runspec.ConfigError, match=f"{root}.*store="):
        pipeline.run(config("method=rtn", "bits=w8a16"), store_root=root)


def test_wandb_logs_the_record_as_written(tmp_path, monkeypatch):
    """What wandb gets is the record read back from its file (same key, metrics, status, fault),
    failed runs included; a wandb error never loses the record."""
    from qdlm_bench import tracking

    logged = []
    monkeypatch.setattr(tracking.WandbLogger, "log_record", lambda self, record: logged.append(record))
    wandb_cfg = {"mode": "offline", "dir": str(tmp_path / "wb")}
    done = pipeline.run(config("method=rtn", "bits=w8a16"), store_root=tmp_path, wandb_cfg=wandb_cfg)

    def broken(state):
        raise RuntimeError("quantizer exploded")

    rtn = methods.get("rtn")
    monkeypatch.setitem(methods._REGISTRY, "rtn", replace(rtn, recipe=lambda o: [broken]))
    failed = pipeline.run(config("method=rtn", "bits=w4a16"), store_root=tmp_path, wandb_cfg=wandb_cfg)
    assert [r["status"] for r in logged] == ["done", "failed"]
    for record, sent in zip((done, failed), logged):
        assert sent == json.loads(ResultStore(tmp_path).path_for(record["key"]).read_text()) == record
    # a skipped run (already done) logs nothing again; a wandb failure is logged, the run returns
    assert pipeline.run(config("method=rtn", "bits=w8a16"), store_root=tmp_path, wandb_cfg=wandb_cfg) == done
    assert len(logged) == 2
    monkeypatch.setattr(tracking.WandbLogger, "log_record", lambda self, record: 1 / 0)
    again = pipeline.run(config("method=rtn", "bits=w4a16"), store_root=tmp_path, wandb_cfg=wandb_cfg, force=True)
    assert again["status"] == "failed" and ResultStore(tmp_path).get(again["key"]) == again


def test_how_a_run_executes_never_changes_its_record_key():
    """Batch size, the code sandbox, progress bars, compilation and paths decide how, not what: one record."""
    def key(*overrides):
        return spec_key(runspec.build(config("tasks=[mini_code]", *overrides)).semantic())

    default = key()
    for override in ("eval.batch_size=3", "eval.code_sandbox=none", "+eval.progress=true", "eval.compile=true"):
        assert key(override) == default, override
    assert key("eval.mc_num=4") != default

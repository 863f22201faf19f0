import json
import subprocess
import sys

import pytest

from qdlm_bench.store import new_record
from qdlm_bench.tracking import SUMMARY_FIELDS, WandbLogger, flatten_metrics

SPEC = {"model": {"name": "tiny-llada"}, "method": {"name": "rtn"}, "quant": {"bits": "w4a16g128"},
        "tasks": ["arith"], "eval": {"gen_length": 32}, "calib": {}, "dtype": "bfloat16", "seed": 0}
METRICS = {"arith": {"metric": "exact_match,none", "value": 0.75, "stderr": 0.05,
                     "all": {"exact_match,none": 0.75, "exact_match_stderr,none": 0.05, "alias": "arith"}},
           "ppl": {"metric": "word_perplexity,none", "value": 12.5, "stderr": "N/A"}}
TIMINGS = {"quantize_s": 1.5, "total_s": 3.0}


def make_record():
    return new_record(SPEC, metrics=METRICS, timings=TIMINGS, sweep="sweep-a")


def test_flatten_metrics_keeps_numbers_only():
    assert flatten_metrics(make_record()) == {
        "arith/exact_match,none": 0.75, "arith/exact_match_stderr,none": 0.05,
        "ppl/word_perplexity,none": 12.5, "time/quantize_s": 1.5, "time/total_s": 3.0}


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        WandbLogger(mode="offlin")


def test_disabled_mode_does_nothing_and_never_imports_wandb():
    code = ("import sys; from qdlm_bench.tracking import WandbLogger; "
            "assert WandbLogger().log_record({'key': 'k', 'metrics': {}}) is None; "
            "assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def read_wandb_file(path):
    """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of chunks
    with 7-byte headers: crc32, length, type 1=full 2=first 3=middle 4=last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunk))
            chunk = b""
    return records


def test_offline_run_holds_the_record(tmp_path, monkeypatch):
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = WandbLogger(mode="offline", project="qdlm-test", dir=tmp_path / "wb")
    first_dir = logger.log_record(new_record(dict(SPEC, seed=1)))
    record = make_record()
    run_dir = logger.log_record(record)  # a second run in one process is flushed too
    assert run_dir.parent == first_dir.parent == tmp_path / "wb" / "wandb"
    assert run_dir.name.startswith("offline-run-") and run_dir != first_dir

    by_type = {}
    for r in read_wandb_file(next(run_dir.glob("*.wandb"))):
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)
    run = by_type["run"][0].run
    assert (run.project, run.run_group, run.display_name) == ("qdlm-test", "sweep-a", "tiny-llada/rtn/w4a16g128")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert {k: config[k] for k in SPEC} == SPEC
    summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
               for r in by_type["summary"] for u in r.summary.update}
    assert {k: summary[k] for k in flatten_metrics(record)} == flatten_metrics(record)
    assert summary["status"] == "done" and summary["key"] == record["key"]
    assert {f: summary[f] for f in SUMMARY_FIELDS} == {f: record[f] for f in SUMMARY_FIELDS}
    artifact = by_type["artifact"][0].artifact
    assert (artifact.name, artifact.type) == (f"record-{record['key']}", "result-record")
    [entry] = artifact.manifest.contents
    assert entry.path == "record.json" and json.load(open(entry.local_path)) == record
    assert entry.local_path.startswith(str(tmp_path))  # nothing written outside the test folder
    assert "exit" in by_type  # the run was finished


def wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var))
    monkeypatch.delenv("WANDB_MODE", raising=False)


def run_records(run_dir):
    """The records of a run's .wandb file by type, its history as {key: value} (a logged dict
    comes as one item per field), and its artifacts by type."""
    by_type, history = {}, {}
    for r in read_wandb_file(next(run_dir.glob("*.wandb"))):
        by_type.setdefault(r.WhichOneof("record_type"), []).append(r)
    for item in (i for r in by_type.get("history", []) for i in r.history.item):
        key, *field = list(item.nested_key) or [item.key]
        value = json.loads(item.value_json)
        if field:
            history.setdefault(key, {})[field[0]] = value
        else:
            history[key] = value
    artifacts = {r.artifact.type: r.artifact for r in by_type.get("artifact", [])}
    return by_type, history, artifacts


def test_offline_outputs_hold_tables_figures_and_files(tmp_path, monkeypatch):
    import pandas as pd
    from qdlm_bench import plots

    wandb_env(monkeypatch, tmp_path)
    figure = plots.line_panels({"p": {"a": ([0, 1], [1.0, 2.0])}}, tmp_path / "fig", title="t", xlabel="x")
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    table = pd.DataFrame({"method": ["fp", "rtn"], "avg": ["70.0", "—"]})
    logger = WandbLogger(mode="offline", project="qdlm-test", dir=tmp_path / "wb", group="sweep-b")
    run_dir = logger.log_outputs("report-x", "report", tables={"m1": table}, images=[figure[0]],
                                 files=[notes, *figure], summary={"finding/a": "holds"})
    by_type, history, artifacts = run_records(run_dir)
    run = by_type["run"][0].run
    assert (run.run_group, run.job_type, run.display_name) == ("sweep-b", "report", "report-x")
    logged = json.loads((run_dir / "files" / history["table/m1"]["path"]).read_text())
    assert logged["columns"] == ["method", "avg"] and logged["data"] == [["fp", "70.0"], ["rtn", "—"]]
    assert history["figure/fig"]["_type"] == "image-file"
    assert (run_dir / "files" / history["figure/fig"]["path"]).stat().st_size > 1000
    summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
               for r in by_type["summary"] for u in r.summary.update}
    assert summary["finding/a"] == "holds"
    assert {e.path for e in artifacts["report"].manifest.contents} == {"notes.md", "fig.png", "fig.pdf"}
    assert WandbLogger().log_outputs("x", "report", files=[notes]) is None  # disabled


def test_report_logs_to_an_offline_run(tmp_path, monkeypatch):
    from qdlm_bench import report
    from qdlm_bench.store import ResultStore

    wandb_env(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)  # the report's wandb dir is ./wandb
    store = ResultStore(tmp_path / "results")
    store.write(new_record(dict(SPEC, method={"name": "fp"}), metrics=METRICS, sweep="sweep-a"))
    store.write(make_record())
    assert report.main(["--store", str(store.root), "--out", str(tmp_path / "reports"), "--sweep", "sweep-a",
                        "--wandb", "offline"]) == 0
    [run_dir] = (tmp_path / "wandb" / "wandb").glob("offline-run-*")
    by_type, history, artifacts = run_records(run_dir)
    assert by_type["run"][0].run.run_group == "sweep-a" and by_type["run"][0].run.job_type == "report"
    table = json.loads((run_dir / "files" / history["table/tiny-llada"]["path"]).read_text())
    assert table["columns"][:3] == ["bits", "method", "status"] and [r[1] for r in table["data"]] == ["fp", "rtn"]
    assert "figure/tiny-llada-sweep-a-drop" in history
    files = {e.path for e in artifacts["report"].manifest.contents}
    assert {"report-sweep-a.md", "tiny-llada-sweep-a.tex", "tiny-llada-sweep-a.csv"} <= files


def test_offline_run_of_a_faulted_record_holds_its_status_error_and_fault(tmp_path, monkeypatch):
    wandb_env(monkeypatch, tmp_path)
    record = new_record(SPEC, status="failed", error="Traceback ...\nNumericalFault: non finite weights at blocks.0.q_proj",
                        fault={"kind": "non_finite_weights", "layer": "blocks.0.q_proj", "detail": "1 NaN"},
                        timings=TIMINGS, sweep="sweep-a")
    run_dir = WandbLogger(mode="offline", project="qdlm-test", dir=tmp_path / "wb").log_record(record)
    by_type, history, artifacts = run_records(run_dir)
    summary = {"/".join(u.nested_key) or u.key: json.loads(u.value_json)
               for r in by_type["summary"] for u in r.summary.update}
    assert {f: summary[f] for f in SUMMARY_FIELDS} == {f: record[f] for f in SUMMARY_FIELDS}
    assert summary["fault"]["layer"] == "blocks.0.q_proj" and summary["status"] == "failed"
    [entry] = artifacts["result-record"].manifest.contents
    assert json.load(open(entry.local_path)) == record

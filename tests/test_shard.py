"""Jobs per task (``shard=task``) and the study in one command (conf/experiment/qdlm_study.yaml).

A task's job gives the numbers of the joint run (bit-equal, per-sample outputs included); the report
merges a setting's task records into one row and lists the tasks still missing; the sweeper, its
pre-validation and the plan expand the same jobs; the study's grid is exactly the intended one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from test_report import make_record

from qdlm_bench import report, sweep_jobs
from qdlm_bench.store import ResultStore

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["mini_math", "mini_qa"]  # one generation task, one likelihood task
NUMBERS = ("metric", "value", "stderr", "all", "samples")  # a task's results in its record (samples: per document)
SMALL = ["model=tiny_llada_instruct", "eval.limit=3", "eval.mc_num=4", "eval.log_samples=true", "device=cpu",
         "+eval.generation={mini_math:{gen_length:16,steps:16,block_length:16}}"]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)


def test_task_jobs_give_the_joint_run_numbers_and_merge_into_one_row(tmp_path):
    joint_store, shard_store = tmp_path / "joint", tmp_path / "shards"
    out = run(f"tasks=[{','.join(TASKS)}]", *SMALL, f"store={joint_store}", f"hydra.run.dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    [joint] = ResultStore(joint_store).records()
    assert joint["spec"]["tasks"] == TASKS

    out = run("-m", "method=rtn", f"tasks=[{','.join(TASKS)}]", "shard=task", *SMALL, f"store={shard_store}",
              f"hydra.sweep.dir={tmp_path / 'multirun'}")
    assert out.returncode == 0, out.stderr[-3000:]
    records = ResultStore(shard_store).records()
    assert sorted((r["method"], tuple(r["spec"]["tasks"])) for r in records) == [  # FP of each task: baseline=auto
        ("fp", ("mini_math",)), ("fp", ("mini_qa",)), ("rtn", ("mini_math",)), ("rtn", ("mini_qa",))]
    assert len(list((tmp_path / "multirun").glob("*/record.key"))) == 2  # two jobs, one per task
    for record in (r for r in records if r["method"] == "rtn"):
        [task] = record["spec"]["tasks"]
        assert list(record["metrics"]) == [task]
        assert record["metrics"][task]["samples"]  # per-sample outputs compared too
        numbers = [{k: r["metrics"][task][k] for k in NUMBERS} for r in (record, joint)]  # not timings
        assert json.dumps(numbers[0], sort_keys=True) == json.dumps(numbers[1], sort_keys=True), task

    # the sweep's report: one table, FP and RTN rows, a column per task
    assert out.stdout.count("## tiny-llada-instruct") == 1 and "## Missing" not in out.stdout
    [table] = report.study_tables(report.records_frame(records))
    assert list(zip(table["method"], table["status"])) == [("fp", "done"), ("rtn", "done")]
    for task in TASKS:
        assert table.loc[1, task] == pytest.approx(100 * joint["metrics"][task]["value"])

    # a single run with shard=task runs each task as its own record: the sweep's, already in the store
    out = run(f"tasks=[{','.join(TASKS)}]", "shard=task", *SMALL, f"store={shard_store}",
              f"hydra.run.dir={tmp_path / 'run2'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (out.stdout + out.stderr).count("skipping tiny-llada-instruct rtn w4a16g128") == 2
    assert len(ResultStore(shard_store).records()) == 4

    # a task not run yet: its cell is missing and the report lists it
    [qa] = [r for r in records if r["method"] == "rtn" and r["spec"]["tasks"] == ["mini_qa"]]
    ResultStore(shard_store).path_for(qa["key"]).unlink()
    [table] = report.study_tables(report.records_frame(ResultStore(shard_store).records()))
    assert table.attrs["missing"] == {"rtn w4a16g128": ["mini_qa"]}
    assert report.format_table(table).loc[1, "mini_qa"] == report.MISSING
    text = report.render([table], [])
    assert "## Missing" in text and "- tiny-llada-instruct | rtn w4a16g128: mini_qa" in text


def test_the_latest_record_of_each_task_fills_a_settings_row():
    joint = make_record("m", "rtn", "w4a16", {"arc_easy": 0.1, "gsm8k": 0.5})
    newer = make_record("m", "rtn", "w4a16", {"arc_easy": 0.3}, tasks=("arc_easy",))
    failed = make_record("m", "gptq", "w4a16", {}, tasks=("gsm8k",), status="failed", error="boom")
    fp = [make_record("m", "fp", None, {t: 0.8}, tasks=(t,)) for t in ("arc_easy", "gsm8k")]
    for record, created in zip([joint, newer, failed, *fp], range(5)):
        record["created"] = f"2026-01-0{created + 1}"
    [table] = report.study_tables(report.records_frame([newer, joint, failed, *fp]))
    rows = {m: table[table["method"] == m].iloc[0] for m in ("fp", "rtn", "gptq")}
    assert (rows["rtn"]["arc_easy"], rows["rtn"]["gsm8k"]) == pytest.approx((30.0, 50.0))
    assert (rows["fp"]["arc_easy"], rows["fp"]["gsm8k"]) == pytest.approx((80.0, 80.0))
    assert rows["gptq"]["status"] == "failed: boom"
    assert table.attrs["missing"] == {"gptq w4a16": ["arc_easy"]}


def test_the_plan_expands_the_jobs_hydra_launches(tmp_path, monkeypatch):
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from qdlm_bench.paths import CONF_DIR

    launched = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def record(cfg):
        launched.append(list(HydraConfig.get().overrides.task))

    cases = {("method=fp,rtn", "tasks=[mini_math,mini_qa]", "shard=task"): 4,
             ("method=fp,rtn", "tasks=[mini_math,mini_qa]"): 2,
             # 6 ladder rungs x the 3 default tasks
             ("+experiment=dllmquant_ablation", "bits=w4a4kv4", "method.base=gptq", "shard=task"): 18}
    for overrides, count in cases.items():
        launched.clear()
        monkeypatch.setattr(sys, "argv", ["run.py", "-m", *overrides, "~hydra.callbacks.report",
                                          f"hydra.sweep.dir={tmp_path}/sweep", "hydra/job_logging=none",
                                          "hydra/hydra_logging=none"])
        record()
        jobs = sweep_jobs.expand(list(overrides))
        assert jobs == [[o for o in job if not o.startswith(("~hydra", "hydra"))] for job in launched]
        assert len(jobs) == count
    assert [job[-1] for job in jobs[:3]] == ["tasks=[mini_qa]", "tasks=[mini_math]", "tasks=[mini_code]"]
    single = sweep_jobs.expand(["tasks=[mini_math,mini_qa]", "shard=task"], multirun=False)
    assert single == [["shard=task", "tasks=[mini_math]"], ["shard=task", "tasks=[mini_qa]"]]


def test_qdlm_study_is_the_intended_grid():
    jobs = sweep_jobs.expand(["+experiment=qdlm_study"])
    models = ["llada_8b_base", "llada_8b_instruct", "llada_1_5", "dream_7b_base", "dream_7b_instruct"]
    settings = [{"method": "fp"}]
    settings += [{"method": m, "bits": b} for m in ("rtn", "gptq", "awq") for b in ("w4a16g128", "w3a16g128")]
    settings += [{"method": m, "bits": b} for m in ("smoothquant", "quarot", "duquant")
                 for b in ("w8a8", "w4a8", "w4a4")]
    settings += [{"method": "dllmquant", "calib": "tmas_real", "method.base": base, "bits": b}
                 for base in ("gptq", "awq") for b in ("w4a16g128", "w4a4kv4")]
    intended = {tuple(sorted({"model": m, **s}.items())) for m in models for s in settings}
    found = Counter(tuple(sorted(dict(o.split("=", 1) for o in job
                                      if not o.startswith(("tasks=", "+experiment"))).items())) for job in jobs)
    assert set(found) == intended and len(intended) == 100
    assert set(found.values()) == {10} and len(jobs) == 1000  # each (setting, task) one job
    tasks = ["arc_easy_local", "arc_challenge_local", "hellaswag_local", "piqa_local", "winogrande_local",
             "mmlu_local", "gsm8k_local", "math500_local", "humaneval_local", "mbpp_local"]
    assert [job[-1] for job in jobs[:10]] == [f"tasks=[{t}]" for t in tasks]

    first = sweep_jobs.compose(jobs[0], ["+experiment=qdlm_study"])
    assert (first["model"]["name"], first["method"]["name"], first["tasks"]) == ("llada-8b-base", "fp", tasks[:1])
    assert first["calib"]["source"] == "wikitext2" and first["shard"] == "task" and first["sweep"] == "qdlm_study"
    assert first["model"]["path"] is None  # no checkpoints folder: the hub id (the plan's stand-in)
    dllmquant = sweep_jobs.compose(jobs[-1] + ["checkpoints=/data/hf"], ["+experiment=qdlm_study"])
    assert dllmquant["method"]["base"] == "awq" and dllmquant["bits"] == "w4a4kv4"
    assert dllmquant["calib"]["source"] == "prompts:gsm8k_local+humaneval_local"
    assert dllmquant["model"]["path"] == "/data/hf/Dream-org/Dream-v0-Instruct-7B"


def test_the_plan_stands_in_for_absent_weights_only_when_told(capsys):
    from qdlm_bench import plan

    common = ["tasks=[mini_math]", "eval.limit=2", "method=fp", "--json"]
    assert plan.main(["model=llada_8b_base", *common]) == 2  # offline: no config or tokenizer of the hub model
    assert "pass model.path=<a local checkpoint folder>" in capsys.readouterr().err
    bench = str(ROOT / "reports/bench/h200-study-throughput.json")
    assert plan.main(["model=llada_8b_base", "plan.tokenizer=byte", f"plan.bench={bench}", *common]) == 0
    stand_in = json.loads(capsys.readouterr().out)
    assert plan.main(["model=llada_8b_random", *common]) == 0  # the same shape and tokenizer, named
    named = json.loads(capsys.readouterr().out)
    assert stand_in["stand_in"] == "byte" and named["stand_in"] is None
    [a], [b] = (d["runs"][0]["tasks"].values() for d in (stand_in, named))
    assert (a["passes"], a["tokens"], a["flops"]) == (b["passes"], b["tokens"], b["flops"]) and a["flops"] > 0
    assert stand_in["throughput_by_kind"]["generate"] == 522.5  # the bench JSON's per-kind rate
    assert a["hours"] == pytest.approx(a["flops"] / 522.5e12 / 3600)


def test_the_sweeps_check_sees_every_task_job(tmp_path):
    out = run("-m", "tasks=[mini_math,nosuch_task]", "shard=task", f"store={tmp_path / 'results'}",
              f"hydra.sweep.dir={tmp_path / 'multirun'}")
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "1 of the sweep's 2 jobs; no job was started" in text, text[-3000:]
    assert "#1 tasks=[nosuch_task]" in text and not list(tmp_path.glob("results/*.json"))
    out = run("-m", "tasks=[mini_math]", "shard=tasks", f"store={tmp_path / 'results'}",
              f"hydra.sweep.dir={tmp_path / 'multirun2'}")
    assert out.returncode == 2 and "shard='tasks'; use one of none, task" in out.stdout + out.stderr

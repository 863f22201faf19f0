"""The plan (``python -m qdlm_bench.plan``): its forward passes and tokens equal what the
evaluation does, counted on the embedded models; its sweep expansion is Hydra's; its statuses.

The time check is a command, not a test (README: "The bill first"): ``plan.throughput=measure
plan.verify=true``."""

import json
import sys

import pytest

from qdlm_bench import cost, plan, sweep_jobs
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models.presets import SHAPES

GREEDY_YAML = """\
task: plan_greedy
dataset_path: json
dataset_kwargs:
  data_files:
    test: "{task_dir}/greedy.jsonl"
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GREEDY_DOCS = [("The capital of France is", " Paris"), ("def add(a, b):\n    return", " a + b"),
               ("Question: 2 + 3 = ?\nAnswer:", " 5"), ("Once upon a time there was", " a little old king")]


@pytest.fixture
def greedy_task(tmp_path):
    """An output_type: loglikelihood task (its requests are also decoded greedily: is_greedy)."""
    (tmp_path / "plan_greedy.yaml").write_text(GREEDY_YAML)
    (tmp_path / "greedy.jsonl").write_text("".join(json.dumps({"context": c, "target": t}) + "\n"
                                                   for c, t in GREEDY_DOCS))
    return tmp_path


def check_counts(overrides: list[str]) -> list[dict]:
    """Plan the run of ``overrides``, evaluate it counting the model's forward calls; per task,
    planned == counted (passes and tokens)."""
    (run,) = plan.make_plan(overrides, multirun=False)
    rows = plan.verify(run)
    assert [r["task"] for r in rows] == [t.task for t in run.tasks]
    for r in rows:
        assert r["counted_passes"] > 0, r
        assert (r["planned_passes"], r["planned_tokens"]) == (r["counted_passes"], r["counted_tokens"]), r
    return rows


def test_planned_passes_and_tokens_are_counted_ones_llada(tmp_path, greedy_task):
    """LLaDA sampler (several blocks; more steps than a block has tokens: idle steps skipped), chat
    template, likelihood batches across requests, rolling windows, is_greedy decoding."""
    check_counts([
        "model=tiny_llada_instruct", "method=fp", f"store={tmp_path / 'results'}", "device=cpu",
        "tasks=[mini_math,mini_code,mini_qa,mini_ppl,plan_greedy]", f"eval.include_path={greedy_task}",
        "eval.limit=2", "eval.batch_size=3", "eval.mc_num=2",
        ("+eval.generation={mini_math:{gen_length:16,steps:8,block_length:8},"
         "mini_code:{gen_length:8,steps:16,block_length:4},mini_ppl:{max_length:96}}"),
    ])


def test_planned_passes_and_tokens_are_counted_ones_dream(tmp_path):
    """Dream's timestep sampler (shifted logits, its own schedule), no chat template."""
    check_counts(["model=tiny_dream_base", "method=rtn", "bits=w4a16g64", f"store={tmp_path / 'results'}",
                  "device=cpu", "tasks=[mini_math]", "eval.limit=3", "eval.batch_size=2",
                  "+eval.generation={mini_math:{gen_length:8,steps:6}}"])


def test_step_counts():
    assert cost.llada_steps(GenerationConfig(gen_length=64, steps=64, block_length=32)) == 64
    assert cost.llada_steps(GenerationConfig(gen_length=8, steps=16, block_length=4)) == 8  # idle steps
    assert cost.dream_steps(GenerationConfig(gen_length=64, steps=128, sampler="dream")) == (128, False)
    assert cost.dream_steps(GenerationConfig(gen_length=64, steps=64, alg="origin")) == (64, True)
    cfg = SHAPES["tiny-llada"]
    plain = cost.generation_cost(cfg, [5, 7, 9], GenerationConfig(gen_length=8, steps=8, block_length=8), 2)
    guided = cost.generation_cost(cfg, [5, 7, 9], GenerationConfig(gen_length=8, steps=8, block_length=8,
                                                                   cfg_scale=1.0), 2)
    assert plain.passes == guided.passes == 16
    assert plain.tokens == 8 * (2 * 15 + 1 * 17) and guided.tokens == 2 * plain.tokens


def test_expand_is_hydras_multirun(tmp_path, monkeypatch):
    """Job lists as Hydra's -m launches them, an experiment's sweeper params included."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from qdlm_bench.paths import CONF_DIR

    launched = []

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def record(cfg):
        launched.append(list(HydraConfig.get().overrides.task))

    for overrides in (["method=fp,rtn", "bits=w4a16,w8a8", "tasks=[mini_math]"],
                      ["+experiment=dllmquant_ablation", "bits=w4a4kv4", "method.base=gptq"]):
        launched.clear()
        monkeypatch.setattr(sys, "argv", ["run.py", "-m", *overrides, "~hydra.callbacks.report",
                                          f"hydra.sweep.dir={tmp_path}/sweep", "hydra/job_logging=none",
                                          "hydra/hydra_logging=none"])
        record()
        jobs = sweep_jobs.expand(overrides)
        assert jobs == [[o for o in job if not o.startswith(("~hydra", "hydra"))] for job in launched]
    assert len(jobs) == 6
    cfg = sweep_jobs.compose(jobs[0])
    assert cfg["method"]["name"] == "dllmquant" and cfg["bits"] == "w4a4kv4" and "hydra" not in cfg


def test_cli_statuses_and_json(tmp_path, capsys):
    """Repeated records (FP at two bit settings), records in the store, baseline=auto's FP run."""
    from qdlm_bench import runspec
    from qdlm_bench.store import ResultStore, new_record

    store = tmp_path / "results"
    common = [f"store={store}", "tasks=[mini_math]", "eval.limit=2", "device=cpu"]
    assert plan.main(["-m", "method=fp,rtn", "bits=w4a16,w8a8", *common, "plan.throughput=100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["job"], r["method"], r["status"]) for r in data["runs"]] == [
        (1, "fp", "to run"), (2, "fp", "= #1"), (3, "rtn", "to run"), (4, "rtn", "to run")]
    one = data["runs"][0]["tasks"]["mini_math"]
    assert one["examples"] == 2 and one["requests"] == 2 and one["passes"] == 64  # 2 blocks x 32 steps, 1 batch
    assert data["to_run"]["runs"] == 3 and data["to_run"]["passes"] == 3 * 64 == data["all"]["passes"] - 64
    assert data["to_run"]["hours"] == pytest.approx(data["to_run"]["flops"] / 100e12 / 3600)

    # the FP record in the store: fp shows "in store" and is no baseline to add
    cfg = sweep_jobs.compose(["method=fp", *common])
    ResultStore(store).write(new_record(runspec.build(cfg).semantic(), status="done", metrics={}, timings={}))
    assert plan.main(["-m", "method=fp,rtn", "bits=w4a16", *common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["job"], r["status"]) for r in data["runs"]] == [(1, "in store"), (2, "to run")]
    assert data["to_run"]["hours"] is None

    # a quantized sweep without fp: baseline=auto's FP run is on the bill, once
    other = [f"store={tmp_path / 'empty'}", *common[1:]]
    assert plan.main(["-m", "method=rtn", "bits=w4a16,w8a8", *other]) == 0
    text = capsys.readouterr().out
    lines = [line.split() for line in text.splitlines() if "mini_math" in line]
    assert [(cells[0], cells[2], cells[-1]) for cells in lines] == [
        ("+", "fp", "baseline"), ("1", "rtn", "run"), ("2", "rtn", "run")]
    assert "to run: 3 run(s)" in text and "no time:" in text


def test_bad_configuration_exits_2(capsys):
    assert plan.main(["method=nope"]) == 2
    assert "invalid configuration" in capsys.readouterr().err


def test_bench_json_throughput():
    """The achieved TFLOP/s of the benchmarks' JSON: sampler's top level, forward's FP figure."""
    from qdlm_bench.paths import PACKAGE_DIR

    bench = PACKAGE_DIR.parent / "reports" / "bench"
    if not bench.is_dir():
        pytest.skip("reports/bench is not shipped in an installed package")
    assert plan.bench_throughput(bench / "h100-sampler.json") == 432.5
    assert plan.bench_throughput(bench / "h100-forward-w4a4-quarot.json") == 488.0
    rate = plan.Rate(100.0, "test", {"generate": 50.0})
    c = cost.Cost(flops=3e14, flops_by_kind={"generate": 1e14, "loglikelihood": 2e14})
    assert rate.hours(c) * 3600 == pytest.approx(1e14 / 50e12 + 2e14 / 100e12)


def test_runs_sharing_a_quantized_model_plan_its_quantization_once(tmp_path, capsys):
    """Two task jobs (shard=task) of one GPTQ setting: the first calibrates, quantizes and saves the
    artifact, the second loads it, so only the first carries calibration on the bill."""
    common = [f"store={tmp_path / 'results'}", "method=gptq", "bits=w4a16g128", "eval.limit=2", "device=cpu",
              "baseline=skip", "tasks=[mini_math,mini_code]", "shard=task"]
    assert plan.main(["-m", *common, "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["status"], r["artifact"]) for r in runs] == [("to run", False), ("to run", True)]
    assert plan.main(["-m", *common, "artifacts=null", "--json"]) == 0  # no artifacts: each run quantizes
    assert [r["artifact"] for r in json.loads(capsys.readouterr().out)["runs"]] == [False, False]

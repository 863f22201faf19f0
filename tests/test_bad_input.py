"""Bad input fails early and clearly (issue 17, items 2 and 3): the one case table of
``qdlm_bench.bench.config_errors`` (also the bench's), exit codes, and sweeps checked before their
first job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qdlm_bench.bench import config_errors

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = config_errors.OFFLINE


def test_every_bad_input_exits_2_naming_it_before_the_model_loads(tmp_path):
    """Each case: exit status 2, a message naming the bad value and what is allowed, no model
    loaded ("loading model" never logged), no record written. Two subprocesses at a time."""
    assert len(config_errors.CASES) >= 30
    results = config_errors.run_cases(str(tmp_path), timeout=120, workers=2)
    print(config_errors.markdown(results))
    failed = [r for r in results if not r["held"]]
    assert not failed, "\n".join(f"{r['case']}: exit {r['exit_status']}, missing {r['missing']}, loaded "
                                 f"{r['model_loaded']}, records {r['records_written']}: {r['error']}" for r in failed)


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=os.environ | OFFLINE, timeout=timeout)


def _failing_run(tmp_path: Path) -> list[str]:
    """A run that loads its model and then fails (its calibration text is shorter than calib.seqlen)."""
    (tmp_path / "short.txt").write_text("hello world")
    return ["model=tiny_random_llada", "method=gptq", f"calib.source={tmp_path / 'short.txt'}", "calib.n_samples=1",
            "tasks=[mini_ppl]", "eval.limit=1", "baseline=skip", "device=cpu", f"store={tmp_path / 'results'}",
            f"hydra.run.dir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def test_a_failed_run_exits_1(tmp_path):
    out = _run([*_failing_run(tmp_path), "calib.seqlen=64"], tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "exit status 1: the run failed" in out.stdout + out.stderr
    assert len(list((tmp_path / "results").glob("*.json"))) == 1


def test_a_sweep_with_a_failed_job_prints_its_table_then_exits_1(tmp_path):
    out = _run(["-m", *_failing_run(tmp_path), "calib.seqlen=4,64"], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "tiny-random-llada" in out.stdout and "wrote" in out.stdout  # the report, printed
    assert "FAILED tiny-random-llada gptq" in out.stdout and "1 failed and 0 invalid job(s): exit status 1" in out.stdout
    assert len(list((tmp_path / "results").glob("*.json"))) == 2


def test_a_sweep_is_checked_whole_before_its_first_job(tmp_path):
    out = _run(["-m", "bits=w4a16,w9a3,w8a8,w4a16g999", f"store={tmp_path / 'results'}",
                f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]
    assert "invalid configuration: 2 of the sweep's 4 jobs; no job was started" in text
    assert "#1 bits=w9a3: invalid quantization spec 'w9a3'" in text and "#3 bits=w4a16g999: " in text
    assert "loading model" not in text and "Launching" not in text
    assert not list(tmp_path.glob("results/*.json"))


@pytest.mark.parametrize("tasks, expected", [("mini_math", ["mini_math"]), (["mini_math", "mini_qa"], ["mini_math", "mini_qa"])])
def test_a_single_task_name_is_the_one_task_list(tasks, expected):
    from qdlm_bench import runspec

    assert runspec.task_list(tasks) == expected
    with pytest.raises(runspec.ConfigError, match=r"tasks=\[mini_math,mini_code\]"):
        runspec.task_list("mini_math,mini_code")


def test_progress_bar_changes_no_generated_token():
    import torch

    from qdlm_bench import diffusion
    from qdlm_bench.evaluation.adapter import RequestBar
    from qdlm_bench.models import random_model

    model = random_model("tiny-llada", seed=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    cfg = diffusion.GenerationConfig(gen_length=8, steps=8, block_length=4)

    def generate(on_step=None):
        return diffusion.generate(model, prompts, cfg, batch_size=2, on_step=on_step,
                                  generator=torch.Generator().manual_seed(0))

    with RequestBar("t generate_until", len(prompts), cfg.steps, enabled=True) as bar:
        with_bar = generate(bar.on_step)
        assert bar.bar.n == pytest.approx(len(prompts))  # both batches counted, the last one whole
    assert with_bar == generate()


def test_a_job_found_invalid_in_a_launcher_worker_reaches_the_sweep_exit_status(tmp_path):
    # a worker process's OUTCOME is not the sweep's: the job leaves its reason in its folder
    from qdlm_bench.sweep_report import JOB_INVALID, invalid_jobs

    for num, reason in ((0, None), (1, "bits=w9a3: invalid"), (2, None), (3, "model=x: no such model")):
        (tmp_path / str(num)).mkdir()
        if reason:
            (tmp_path / str(num) / JOB_INVALID).write_text(reason)
    assert invalid_jobs(tmp_path) == ["bits=w9a3: invalid", "model=x: no such model"]

"""The code sandbox: hostile programs contained in each mode available here, mode choice and checks.

A mode this machine cannot run is skipped with the reason (what is missing); ``none`` is held
only to the limits every mode has (timeout, memory, output, killing what the program leaves).
"""

import functools
import logging
import os
import pwd
import shutil
import time

import pytest
import torch

from qdlm_bench import evaluation, sandbox, sandbox_cgroup
from qdlm_bench.code_exec import run_program, run_programs
from qdlm_bench.sandbox_probes import PROBES, probe_site, run_probe

ISOLATING = ("bwrap", "unshare")


def _mode(mode: str):
    reason = sandbox.missing(mode)
    return pytest.param(mode, marks=pytest.mark.skipif(reason is not None, reason=f"{mode} unavailable: {reason}"))


def _process_bound(mode: str) -> str | None:
    """Why a fork storm is not bounded in ``mode`` here (None: it is)."""
    if sandbox_cgroup.available():
        return None
    if mode == "none":
        return "none sets no process limit without a writable pids cgroup"
    if os.getuid() == 0:
        return "root is exempt from RLIMIT_NPROC and no pids cgroup is writable here"
    return None


CASES = [pytest.param(probe, mode, id=f"{probe.name}-{mode}")
         for mode in ("bwrap", "unshare", "none") for probe in PROBES
         if mode != "none" or probe.always or probe.name == "fork_storm"]


@pytest.mark.parametrize("probe, mode", CASES)
def test_hostile_program_is_contained(probe, mode, tmp_path):
    if sandbox.missing(mode):
        pytest.skip(f"{mode} unavailable: {sandbox.missing(mode)}")
    if probe.name == "fork_storm" and _process_bound(mode):
        pytest.skip(_process_bound(mode))
    with probe_site(tmp_path) as site:
        outcome = run_probe(probe, site, functools.partial(run_program, sandbox_mode=mode), timeout=3.0)
    assert outcome["escaped"] is None, outcome
    assert outcome["seconds"] < 3.0 + 5


@pytest.mark.parametrize("mode", [_mode(m) for m in ("bwrap", "unshare", "none")])
def test_correct_and_wrong_programs_score_in_every_mode(mode):
    assert run_program("import os, sys\nassert os.listdir('.') == ['program.py']\nassert sys.flags.isolated",
                       sandbox_mode=mode).passed
    wrong = run_program("assert 1 == 2, 'nope'", sandbox_mode=mode)
    assert wrong.status == "failed" and "nope" in wrong.stderr and wrong.sandbox == mode


@pytest.mark.parametrize("mode", [_mode(m) for m in ISOLATING])
def test_homes_and_temp_dirs_are_hidden_and_the_rest_read_only(mode, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    real_home = pwd.getpwuid(os.getuid()).pw_dir  # may hold Python's install: only that shows
    python_parts = {p[len(real_home):].strip("/").split("/")[0] for p in sandbox.python_dirs()
                    if p.startswith(real_home + "/")}
    program = (f"import os\nassert not os.path.exists({str(home)!r})\n"
               f"assert not os.path.exists({str(tmp_path)!r})\n"
               f"seen = set(os.listdir({real_home!r})) if os.path.isdir({real_home!r}) else set()\n"
               f"assert seen <= {python_parts!r}, seen\n"
               "open('mine.txt', 'w').write('ok')\n"  # its own folder is writable
               "for folder in ('/usr', '/etc', '/var'):\n"
               "    try:\n        open(folder + '/qdlm_probe', 'w')\n    except OSError:\n        pass\n"
               "    else:\n        raise SystemExit('wrote ' + folder)\n")
    result = run_program(program, sandbox_mode=mode)
    assert result.passed, result.stderr


def test_auto_takes_the_strongest_and_never_falls_back_to_none(monkeypatch, caplog):
    if sandbox.available():
        with caplog.at_level(logging.INFO, logger="qdlm_bench"):
            sandbox._announce.cache_clear()
            assert sandbox.resolve("auto") == sandbox.available()[0]
        assert f"run in {sandbox.available()[0]}" in caplog.text
    monkeypatch.setattr(sandbox, "missing", lambda mode: None if mode == "none" else f"{mode} not found on PATH")
    with pytest.raises(ValueError, match="apt-get install bubblewrap.*eval.code_sandbox=none"):
        sandbox.resolve("auto")
    with pytest.raises(ValueError, match="bwrap cannot run here.*apt-get install bubblewrap"):
        sandbox.resolve("bwrap")
    assert sandbox.resolve("none") == "none"


@pytest.mark.skipif(sandbox.missing("unshare") is not None, reason=f"unshare unavailable: {sandbox.missing('unshare')}")
def test_without_bwrap_on_path_auto_uses_unshare(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("unshare", "prlimit"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))
    sandbox.missing.cache_clear()
    try:
        assert sandbox.missing("bwrap") == "bwrap not found on PATH"
        assert sandbox.resolve("auto") == "unshare"
        assert run_program("print('hi')").sandbox == "unshare"
    finally:
        sandbox.missing.cache_clear()


def test_none_warns_once_per_process(caplog):
    sandbox.warn_unsandboxed.cache_clear()
    with caplog.at_level(logging.WARNING, logger="qdlm_bench"):
        run_programs(["pass", "pass"], sandbox_mode="none")
        run_program("pass", sandbox_mode="none")
    assert sum("WITHOUT a sandbox" in r.message for r in caplog.records) == 1


def test_using_sets_the_mode_of_run_programs():
    with sandbox.using("none"):
        assert {r.sandbox for r in run_programs(["pass"] * 2)} == {"none"}
    assert sandbox.configured() == "auto"


def test_timeout_holds_when_an_escaped_child_keeps_stderr_open():
    start = time.monotonic()
    result = run_program("import subprocess\nsubprocess.Popen(['setsid', 'sleep', '301.5'])\nwhile True:\n    pass",
                         timeout=1.0, sandbox_mode=sandbox.available()[0] if sandbox.available() else "none")
    assert result.status == "timeout" and time.monotonic() - start < 1.0 + 4


# ------------------------------------------------------------------ settings and task checks
def test_settings_reject_an_unknown_mode():
    with pytest.raises(ValueError, match="auto, bwrap, unshare, none"):
        evaluation.EvalSettings.from_dict({"code_sandbox": "docker"})
    assert evaluation.EvalSettings().code_sandbox == "auto"


def test_code_tasks_are_checked_before_any_model_work(monkeypatch):
    assert evaluation.check_sandbox(["mini_math"], "auto") is None  # no code task: nothing to check
    with pytest.raises(ValueError, match="lm-eval's own code tasks.*humaneval_local"):
        evaluation.validate_tasks(["humaneval"], code_sandbox="auto")
    assert evaluation.check_sandbox(["humaneval"], "none") == "none"
    monkeypatch.setattr(sandbox, "missing", lambda mode: None if mode == "none" else f"{mode} not found on PATH")
    with pytest.raises(ValueError, match="found no sandbox"):
        evaluation.validate_tasks(["mini_code", "mini_math"], code_sandbox="auto")
    evaluation.validate_tasks(["mini_math"], code_sandbox="auto")
    assert evaluation.check_sandbox(["mini_code"], "none") == "none"


def test_the_record_says_which_sandbox_scored_a_code_task(tmp_path):
    from qdlm_bench.models import DiffusionLM, DLLMConfig
    from qdlm_bench.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = DLLMConfig(family="llada", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                     d_ff=64, max_seq_len=1024, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"),
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    mode = sandbox.available()[0] if sandbox.available() else "none"
    settings = evaluation.EvalSettings.from_dict(
        {"limit": 2, "code_sandbox": mode, "generation": {"": {"gen_length": 8, "steps": 8, "block_length": 8}}})
    out = evaluation.run(DiffusionLM(cfg).eval(), tok, ["mini_code"], settings)
    assert out["mini_code"]["code_sandbox"] == mode and out["mini_code"]["metric"] == "pass@1,none"


def test_bench_times_every_mode_against_the_pre_sandbox_subprocess():
    from qdlm_bench.bench import sandbox as bench

    result = bench.run(["programs=2", "probes=0"])
    assert set(result["median_ms_per_program"]) == {"baseline", *sandbox.available(), "none"}
    assert all(v > 0 for v in result["median_ms_per_program"].values())

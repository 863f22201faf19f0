"""Execution of generated programs (in the strongest sandbox here) and the pass@k estimator.
The sandbox's own guarantees: test_sandbox.py."""

import math
import time

import pytest

from qdlm_bench import sandbox
from qdlm_bench.code_exec import pass_at_k, run_program, run_programs


@pytest.fixture(autouse=True)
def strongest_sandbox():
    """Scoring does not depend on the mode: the strongest here, else none (no sandbox installed)."""
    with sandbox.using((sandbox.available() or ["none"])[0]):
        yield

ADD = "def add(a, b):\n    return {body}\n\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_correct_program_passes_and_wrong_one_fails():
    assert run_program(ADD.format(body="a + b")).passed
    wrong = run_program(ADD.format(body="a * b"))
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr


@pytest.mark.parametrize("program", [
    "raise RuntimeError('boom')",
    "import sys; sys.exit(3)",
    "def f(:\n    pass",  # syntax error
    "import os; os.abort()",  # killed by a signal
])
def test_crashes_fail(program):
    assert run_program(program).status == "failed"


def test_memory_limit_stops_a_large_allocation():
    result = run_program("x = bytearray(2**31)", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_program("while True:\n    pass", timeout=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 5


def test_runs_isolated_in_an_empty_directory():
    assert run_program("import os, sys\nassert os.listdir('.') == ['program.py']\nassert sys.flags.isolated").passed


def test_run_programs_keeps_order_and_runs_in_parallel():
    programs = ["import time; time.sleep(1)"] * 4 + ["assert False"]
    start = time.monotonic()
    results = run_programs(programs, workers=5)
    assert [r.status for r in results] == ["passed"] * 4 + ["failed"]
    assert time.monotonic() - start < 3.5  # 4 one-second sleeps side by side


@pytest.mark.parametrize("n, c, k, expected", [
    (10, 0, 1, 0.0),
    (10, 10, 1, 1.0),
    (10, 3, 1, 0.3),
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),
    (20, 5, 10, 1 - math.comb(15, 10) / math.comb(20, 10)),
    (4, 2, 3, 1.0),  # fewer than k failures: some k-subset always passes
])
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)

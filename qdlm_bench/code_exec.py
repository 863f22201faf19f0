"""Execute generated programs and score them with pass@k (HumanEval / MBPP style).

Each program runs in its own ``python -I`` subprocess, in an empty temporary directory, with a
wall-clock timeout and resource limits (address space, CPU time, no core files), in a new
session so that a timeout kills everything it started. This isolates crashes, hangs and
memory blow-ups from the harness; it is not a security sandbox: only run model output on a
machine you would run untrusted code on (the evaluation machines have no network).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    stderr: str = ""  # the last lines of stderr, for inspection

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(program: str, *, timeout: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> ExecResult:
    """Run ``program`` (source text) in a fresh interpreter; passed = exit status 0 in time."""

    def limit():  # runs in the child before exec
        mem = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="qdlm_exec_") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, preexec_fn=limit, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult("timeout")
    tail = "\n".join(err.decode("utf-8", "replace").strip().splitlines()[-5:])
    return ExecResult("passed" if proc.returncode == 0 else "failed", tail)


def run_programs(programs: list[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, workers: int | None = None) -> list[ExecResult]:
    """``run_program`` over many programs, ``workers`` at a time (default: min(8, CPU count))."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # threads only wait on their subprocesses
        return list(pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

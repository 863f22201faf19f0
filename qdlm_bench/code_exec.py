"""Execute generated programs and score them with pass@k (HumanEval / MBPP style).

Each program runs as ``python -I program.py`` in its own empty temporary directory, inside the
sandbox of ``eval.code_sandbox`` (``qdlm_bench.sandbox``: bwrap, unshare, or none), and in every
mode with:

- limits: address space (``memory_mb``), CPU time (``timeout`` + 1 s), file size ``OUTPUT_MB``
  (stderr goes to a file, so it caps the output kept; stdout is discarded), ``MAX_FILES`` open
  files, no core files; processes: see ``qdlm_bench.sandbox``;
- a wall-clock ``timeout`` that holds whatever the program does: no pipe is shared with it, and at
  its end every process it started is killed (its PID namespace, its pids cgroup where one can be
  made, its reaper in ``none``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from qdlm_bench import sandbox
from qdlm_bench.sandbox_cgroup import PidsCgroup

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
OUTPUT_MB = 16
MAX_FILES = 256
STDERR_TAIL_BYTES = 4096
GRACE_S = 2.0  # after the timeout: for none's reaper to kill what the program left, before SIGKILL


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    stderr: str = ""  # the last lines of stderr, for inspection
    sandbox: str = ""  # the mode that ran it

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _limits(timeout: float, memory_mb: int, cgroup: PidsCgroup | None):
    def apply():  # runs in the child before exec
        cpu = int(timeout) + 1
        for limit, value in ((resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_CPU, cpu),
                             (resource.RLIMIT_FSIZE, OUTPUT_MB * 2**20), (resource.RLIMIT_NOFILE, MAX_FILES),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))
        if cgroup is not None:
            with open(cgroup.procs, "w") as f:
                f.write(str(os.getpid()))
    return apply


def _tail(file) -> str:
    file.seek(max(0, os.fstat(file.fileno()).st_size - STDERR_TAIL_BYTES))
    return "\n".join(file.read().decode("utf-8", "replace").strip().splitlines()[-5:])


def run_program(program: str, *, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                sandbox_mode: str | None = None) -> ExecResult:
    """Run ``program`` (source text) in a fresh interpreter; passed = exit status 0 in time.
    ``sandbox_mode``: an ``eval.code_sandbox`` value; None = this process's (``sandbox.using``)."""
    mode = sandbox.resolve(sandbox_mode or sandbox.configured())
    if mode == "none":
        sandbox.warn_unsandboxed()
    cgroup = PidsCgroup.create(sandbox.MAX_PROCS)
    try:
        with tempfile.TemporaryDirectory(prefix="qdlm_exec_", ignore_cleanup_errors=True) as tmp:
            work = os.path.join(tmp, "work")
            os.mkdir(work)
            with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
                f.write(program)
            with open(os.path.join(tmp, "stderr"), "w+b") as err:
                status = _run(sandbox.command(mode, work, [sys.executable, "-I", "program.py"]), work, err,
                              timeout, _limits(timeout, memory_mb, cgroup), mode, cgroup)
                return ExecResult(status, "" if status == "timeout" else _tail(err), mode)
    finally:
        if cgroup is not None:
            cgroup.remove()


def _exited(proc: subprocess.Popen, timeout: float) -> bool:
    """Whether ``proc`` exits within ``timeout``: woken by its pidfd the moment it does (Popen.wait
    with a timeout polls, up to 50 ms late), else by Popen.wait where pidfds are missing."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


def _run(cmd: list[str], work: str, err, timeout: float, limits, mode: str, cgroup: PidsCgroup | None) -> str:
    """Run ``cmd``; at the timeout, stop it: SIGTERM to ``none``'s reaper (it kills what the program
    left), SIGKILL to bwrap or unshare (their PID namespace dies with them)."""
    proc = subprocess.Popen(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                            preexec_fn=limits, start_new_session=True, env=sandbox.environment(work))
    try:
        if _exited(proc, timeout):
            return "passed" if proc.wait() == 0 else "failed"
        if mode == "none":
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(GRACE_S)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return "timeout"
    finally:
        if cgroup is not None:
            cgroup.kill_all()


def run_programs(programs: list[str], *, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                 workers: int | None = None, sandbox_mode: str | None = None) -> list[ExecResult]:
    """``run_program`` over many programs, ``workers`` at a time (default: min(8, CPU count))."""
    mode = sandbox.resolve(sandbox_mode or sandbox.configured())
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # threads only wait on their subprocesses
        return list(pool.map(lambda p: run_program(p, timeout=timeout, memory_mb=memory_mb, sandbox_mode=mode),
                             programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k) for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

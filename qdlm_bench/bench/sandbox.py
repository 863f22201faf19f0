"""The code sandbox benchmark:

    python -m qdlm_bench.bench sandbox [programs=30] [probes=1] [timeout=3] [out=bench.json]

Times ``code_exec.run_program`` on a small correct HumanEval-style program, one at a time, in each
sandbox mode available here and in ``none``, against the baseline measured in the same run: the
same program as the pre-sandbox code_exec ran it (a ``python -I`` subprocess with address-space,
CPU and core limits, in a new session, stderr read by ``communicate``). Reports the median and
the overhead per program. With ``probes=1`` it also runs every hostile program of
``qdlm_bench.sandbox_probes`` in each mode: contained, or what got out.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from qdlm_bench import code_exec, sandbox, sandbox_cgroup
from qdlm_bench.sandbox_probes import PROBES, probe_site, run_probe

from .common import parse_args

PROGRAM = ("def add(a, b):\n    return a + b\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
           "    assert candidate(-1, 1) == 0\n\n\ncheck(add)\n")


def baseline(program: str, timeout: float = code_exec.DEFAULT_TIMEOUT_S) -> code_exec.ExecResult:
    """The pre-sandbox run_program (the limits, a new session, stderr through a pipe)."""

    def limit():
        mem = code_exec.DEFAULT_MEMORY_MB * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="qdlm_exec_") as tmp:
        with open(os.path.join(tmp, "program.py"), "w") as f:
            f.write(program)
        out = subprocess.run([sys.executable, "-I", "program.py"], cwd=tmp, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limit,
                             start_new_session=True, env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                             timeout=timeout)
    return code_exec.ExecResult("passed" if out.returncode == 0 else "failed", "", "baseline")


def median_ms(runners: dict, n: int) -> dict[str, float]:
    """Median wall ms per program of each runner, run round-robin (a load spike hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(n):
        for name, run_one in runners.items():
            start = time.perf_counter()
            assert run_one(PROGRAM).passed, name
            times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(t), 1) for name, t in times.items()}


def process_limit() -> str:
    if sandbox_cgroup.available():
        return f"pids cgroup ({sandbox.MAX_PROCS} processes)"
    if os.getuid() != 0:
        return f"RLIMIT_NPROC in the user namespace ({sandbox.MAX_PROCS}; bwrap and unshare only)"
    return "none: root is exempt from RLIMIT_NPROC and no pids cgroup is writable"


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(programs=30, probes=1, timeout=3.0, out=""))
    modes = [*sandbox.available(), "none"]
    runners = {"baseline": baseline, **{m: functools.partial(code_exec.run_program, sandbox_mode=m) for m in modes}}
    for run_one in runners.values():  # warm-up: detection, first imports, page cache
        run_one(PROGRAM)
    timing = median_ms(runners, a["programs"])
    base = timing["baseline"]
    result = {"cpus": os.cpu_count(), "uid": os.getuid(), "modes_available": sandbox.available(),
              "unavailable": {m: sandbox.missing(m) for m in sandbox.STRONGEST_FIRST if sandbox.missing(m)},
              "process_limit": process_limit(), "programs": a["programs"],
              "median_ms_per_program": timing,
              "overhead_ms_vs_baseline": {m: round(timing[m] - base, 1) for m in modes}}
    if a["probes"]:
        table: dict[str, dict] = {}
        for probe in PROBES:
            table[probe.name] = {"attack": probe.description}
            for mode in modes:
                with tempfile.TemporaryDirectory() as folder, probe_site(folder) as site:
                    outcome = run_probe(probe, site, runners[mode], timeout=a["timeout"])
                table[probe.name][mode] = (f"ESCAPED: {outcome['escaped']}" if outcome["escaped"]
                                           else f"contained ({outcome['status']}, {outcome['seconds']} s)")
        result["probes"] = table
    return result

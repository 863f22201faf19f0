"""Sweeps through Hydra launchers (issue 12, item 4): the local GPU pool (joblib workers, each leasing
one GPU id and seeing it alone), ``submitit_local`` (one process per job) and the SLURM preset (its
sbatch script, captured by a stand-in ``sbatch``: no cluster runs here). Each sweep is 4 jobs; every
job's record says where it ran (``host``). GPU ids are fake on CPU: the pin is an environment
variable and a lease file, whatever the ids name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from test_pipeline import FAST

from qdlm_bench.store import ResultStore

BITS = ("w4a16", "w8a16", "w3a16", "w4a16g64")
JOBS = [f"bits={','.join(BITS)}", "method=rtn", *FAST, "baseline=skip", "device=cpu"]


def cli(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``qdlm-bench -m *args`` in ``tmp_path`` (store ``results``, leases under ``locks``): its result and wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "QDLM_GPU_LOCK_DIR": str(tmp_path / "locks"), **(env or {})}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "qdlm_bench.cli", "-m", *args, f"store={tmp_path / 'results'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return out, time.perf_counter() - start


def check_sweep(tmp_path: Path) -> list[dict]:
    """The sweep's 4 records: one file per configuration, each job run once, in one sweep folder."""
    store = tmp_path / "results"
    records = ResultStore(store).records()
    assert sorted(r["bits"] for r in records) == sorted(BITS)
    assert all(r["status"] == "done" for r in records)
    assert sorted(p.name for p in store.glob("*.json")) == sorted(f"{r['key']}.json" for r in records)
    (sweep_dir,) = (tmp_path / "multirun").iterdir()  # every job in the launching process's folder
    job_keys = sorted(p.read_text() for p in sweep_dir.glob("*/record.key"))
    assert job_keys == sorted(r["key"] for r in records)
    logs = "".join(p.read_text() for p in sweep_dir.glob("*/cli.log"))
    assert len(re.findall(r"\] - wrote \S+ \(done\)", logs)) == 4  # each configuration computed once
    assert {r["sweep"] for r in records} == {sweep_dir.name}
    assert (sweep_dir / "report" / "report.md").is_file()
    return records


LEASE_SCRIPT = """
import os, sys
from qdlm_bench import gpu_pool
first = gpu_pool.pin(wait_s=0)
os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"   # a job that widened it: the next pin narrows it again
print(first, gpu_pool.pin(), os.environ["CUDA_VISIBLE_DEVICES"], gpu_pool.host()["gpu"], flush=True)
sys.stdin.read()                              # hold the lease until the parent closes stdin
"""


def lease(tmp_path: Path) -> subprocess.Popen:
    """A process that leases a GPU of the pool 0,1 (at once, or fails), prints what it got and holds it
    until its stdin closes."""
    env = {**os.environ, "QDLM_GPU_LOCK_DIR": str(tmp_path / "locks"), "CUDA_VISIBLE_DEVICES": "0,1"}
    return subprocess.Popen([sys.executable, "-c", LEASE_SCRIPT], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_local_gpu_pool_runs_two_workers_each_on_its_own_gpu(tmp_path):
    out, wall = cli(tmp_path, "hydra/launcher=local_gpus", *JOBS, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GPU pool 0,1: 2 worker(s), one GPU each" in out.stdout + out.stderr
    records = check_sweep(tmp_path)
    for r in records:  # each job saw exactly the one GPU its worker leased
        assert r["host"]["gpu"] in ("0", "1") and r["host"]["cuda_visible_devices"] == r["host"]["gpu"], r["host"]
    by_worker = {}
    for r in records:
        by_worker.setdefault(r["host"]["pid"], set()).add(r["host"]["gpu"])
    assert len(by_worker) == 2 and all(len(g) == 1 for g in by_worker.values()), by_worker  # sticky leases
    assert set.union(*by_worker.values()) == {"0", "1"}  # the two workers held different GPUs
    print(f"local_gpus, 2 workers, 4 jobs: {wall:.1f} s; jobs per worker pid: "
          f"{ {pid: sum(r['host']['pid'] == pid for r in records) for pid in by_worker} }")


def test_submitit_local_runs_each_job_once_in_its_own_process(tmp_path):
    out, wall = cli(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                    "hydra.launcher.cpus_per_task=1", *JOBS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = check_sweep(tmp_path)
    assert len({r["host"]["pid"] for r in records}) == 4
    # submitit_local gives each job gpus_per_node GPUs, the same ones (here none): no lease
    assert all(r["host"]["cuda_visible_devices"] == "" and r["host"]["gpu"] is None for r in records)
    print(f"submitit_local, 4 jobs: {wall:.1f} s")


def test_slurm_preset_submits_a_one_gpu_per_job_array(tmp_path):
    """The sweep through the real launcher up to ``sbatch``, which a stand-in replaces: it keeps the
    script and fails the submission (no SLURM here; submitit only checks that ``srun`` exists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {"sbatch": f'cp "$1" {tmp_path / "job.sbatch"}\necho "stand-in sbatch: no SLURM here" >&2',
                 "srun": 'echo "stand-in srun: no SLURM here" >&2'}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    out, _ = cli(tmp_path, "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.array_parallelism=2",
                 "hydra.launcher.setup=[module load cuda]", *JOBS,
                 env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert out.returncode != 0 and "stand-in sbatch: no SLURM here" in out.stdout + out.stderr
    script = (tmp_path / "job.sbatch").read_text()
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--cpus-per-task=8", "--mem=64GB",
                 "--partition=gpu", "--time=240", "--array=0-3%2"):
        assert f"#SBATCH {line}\n" in script, script
    assert "\nmodule load cuda\n" in script and "submitit.core._submit" in script
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


def test_a_pool_too_small_or_taken_is_refused_before_any_job(tmp_path):
    out, _ = cli(tmp_path, "hydra/launcher=local_gpus", "hydra.launcher.n_jobs=3", *JOBS,
                 env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert out.returncode == 2
    assert "hydra.launcher.n_jobs=3 workers but 2 GPU(s) in the pool 0,1; use 1 <= n_jobs <= 2" in out.stdout + out.stderr
    holder = lease(tmp_path)  # another sweep's worker holds GPU 0
    assert holder.stdout.readline().split()[0] == "0"
    out, _ = cli(tmp_path, "hydra/launcher=local_gpus", *JOBS, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    holder.communicate(timeout=60)
    assert out.returncode == 2
    assert re.search(r"GPUs of the pool are leased by other processes \{'0': '\S+ pid \d+'\}", out.stdout + out.stderr)
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


def test_leases_are_exclusive_sticky_and_freed_when_the_holder_exits(tmp_path):
    first = lease(tmp_path)
    assert first.stdout.readline().split() == ["0"] * 4  # leased once; the second pin keeps the same GPU
    second = lease(tmp_path)
    assert second.stdout.readline().split() == ["1"] * 4
    third = lease(tmp_path)  # both held: refused, naming the holders and the fix
    _, err = third.communicate(timeout=60)
    assert third.returncode == 1
    assert re.search(r"PoolError: no free GPU in the pool 0,1 \(held: \{'0': '\S+ pid \d+', '1': '\S+ pid \d+'\}\); "
                     r"run at most one worker per GPU \(hydra.launcher.n_jobs <= 2\)", err), err
    first.communicate(timeout=60)  # exits: the kernel drops its lock
    fourth = lease(tmp_path)
    assert fourth.stdout.readline().split() == ["0"] * 4
    for proc in (second, fourth):
        proc.communicate(timeout=60)

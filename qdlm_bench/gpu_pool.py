"""One GPU per job process for local multi-GPU sweeps (``hydra/launcher=local_gpus``), and where a
job ran (``host``, a field of every record).

Hydra's joblib launcher runs a sweep's jobs in ``n_jobs`` worker processes (loky: fresh interpreters,
each reused for several jobs) and assigns them no GPU; ``submitit_local`` gives every job the same
GPUs (``range(gpus_per_node)``). Here each worker, at the start of its first job and before anything in it touches CUDA, leases
one id of the pool (the launching process's ``CUDA_VISIBLE_DEVICES``, else every GPU ``nvidia-smi -L``
lists) with a non-blocking ``flock`` on ``<lock dir>/gpu-<id>.lock``, and sets ``CUDA_VISIBLE_DEVICES``
to that id alone. It keeps the lease for its lifetime (sticky: CUDA cannot be re-pinned once used);
the kernel drops the lock when the process exits, however it exits. So every job of a worker sees
the same single GPU, as ``cuda:0``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("qdlm_bench")

LAUNCHER = "local_gpus"  # conf/hydra/launcher/local_gpus.yaml: the launcher choice whose jobs lease a GPU
LOCK_DIR_ENV = "QDLM_GPU_LOCK_DIR"  # where the lease files live (default: <tmp>/qdlm-bench-gpu-locks, per host)
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
NO_GPUS = ("no GPU in the pool: CUDA_VISIBLE_DEVICES is unset or empty and nvidia-smi lists none; set "
           "CUDA_VISIBLE_DEVICES=0,1,... to the pool's GPUs")


class PoolError(RuntimeError):
    """No GPU can be leased (none in the pool, all taken) or CUDA was used before the pin; the
    message says the fix."""


@dataclass(frozen=True)
class Lease:
    gpu: str  # the id this process leased (an index, a GPU-/MIG- UUID: as CUDA_VISIBLE_DEVICES had it)
    fd: int   # the locked lease file, open for the process's lifetime


LEASE: Lease | None = None  # this process's lease, once taken


def pool() -> list[str]:
    """The GPU ids a pooled sweep shares: ``CUDA_VISIBLE_DEVICES`` when set, else one index per GPU
    that ``nvidia-smi -L`` lists (none without the tool)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i in range(sum(line.startswith("GPU ") for line in listing.splitlines()))]


def pool_size() -> int:
    """The number of GPUs in the pool: ``local_gpus.yaml``'s default ``n_jobs`` (resolver ``gpu_pool_size``)."""
    return len(pool())


def lock_dir() -> Path:
    """The folder of lease files, shared by every user of this host (mode 1777 when created here)."""
    root = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir(), "qdlm-bench-gpu-locks"))
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        try:
            root.chmod(0o1777)
        except OSError:  # made at once by another user's process: theirs to set
            pass
    return root


def lock_file(gpu: str) -> Path:
    return lock_dir() / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def try_lease(gpu: str) -> int | None:
    """The open, locked lease file of ``gpu`` (its holder written in it), or None when another process holds it."""
    path = lock_file(gpu)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        raise PoolError(f"cannot open the GPU lease file {path}: permission denied; set {LOCK_DIR_ENV} to a "
                        "folder every user of the pool can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        os.fchmod(fd, 0o666)  # other users' workers open it too
    except PermissionError:  # created by another user
        pass
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    return fd


def lease_any(ids: list[str]) -> Lease | None:
    """A lease of the first free id of ``ids``; None when other processes hold them all."""
    for gpu in ids:
        fd = try_lease(gpu)
        if fd is not None:
            return Lease(gpu=gpu, fd=fd)
    return None


def holders(ids: list[str]) -> dict[str, str]:
    """{id: its holder as written in its lease file} of the ids another process holds now."""
    held = {}
    for gpu in ids:
        fd = try_lease(gpu)
        if fd is None:
            held[gpu] = lock_file(gpu).read_text().strip() or "unknown"
        else:
            os.close(fd)  # closing drops the lock
    return held


def pin(wait_s: float = 30.0) -> str:
    """Lease one GPU of ``pool()`` for this process (once: later calls return the same id) and make it
    the only device CUDA sees. Waits up to ``wait_s`` for a free id (a replaced worker's predecessor
    may still be exiting), then raises PoolError."""
    global LEASE
    if LEASE is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise PoolError("CUDA was initialised in this process before its GPU was pinned; pin at the start "
                            "of the job, before anything touches torch.cuda")
        ids = pool()
        if not ids:
            raise PoolError(NO_GPUS)
        deadline = time.monotonic() + wait_s
        while (lease := lease_any(ids)) is None:
            if time.monotonic() >= deadline:
                raise PoolError(f"no free GPU in the pool {','.join(ids)} (held: {holders(ids)}); run at most one "
                                f"worker per GPU (hydra.launcher.n_jobs <= {len(ids)}), and no other sweep on "
                                f"them (lease files in {lock_dir()})")
            time.sleep(1.0)
        LEASE = lease
        log.info("pid %d leased GPU %s of the pool %s", os.getpid(), LEASE.gpu, ",".join(ids))
    os.environ["CUDA_VISIBLE_DEVICES"] = LEASE.gpu
    return LEASE.gpu


def host() -> dict:
    """Where this process runs: hostname, pid, ``CUDA_VISIBLE_DEVICES``, the leased GPU (None when not
    pooled) and, under SLURM, its job/array ids (lower-cased variable names)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu": LEASE.gpu if LEASE is not None else None,
            **{name.lower(): os.environ[name] for name in SLURM_VARS if name in os.environ}}


class CheckGpuPool(Callback):
    """Before a ``local_gpus`` sweep starts (in the launching process): the pool is not empty, it has
    a GPU for every worker, and no other process holds one of them; else exit status 2."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.runtime.choices.get("hydra/launcher") != LAUNCHER:
            return
        ids, workers = pool(), int(config.hydra.launcher.n_jobs)
        held = holders(ids)
        problem = None
        if not ids:
            problem = NO_GPUS
        elif not 0 < workers <= len(ids):
            problem = (f"hydra.launcher.n_jobs={workers} workers but {len(ids)} GPU(s) in the pool {','.join(ids)}; "
                       f"use 1 <= n_jobs <= {len(ids)} (one GPU per worker)")
        elif held:
            problem = (f"GPUs of the pool are leased by other processes {held}; wait for them, or narrow "
                       "CUDA_VISIBLE_DEVICES to free ones")
        if problem:
            log.error("invalid configuration: %s", problem)
            raise SystemExit(2)
        log.info("GPU pool %s: %d worker(s), one GPU each", ",".join(ids), workers)

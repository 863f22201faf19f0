"""A pids cgroup per program, where this user may create one (root, or a delegated cgroup v2).

It bounds the processes of a program run by root (exempt from ``RLIMIT_NPROC``) and finds every
one of them to kill, whatever session or parent it ended up with. Elsewhere ``create`` returns
None and the sandbox's namespaces do both jobs.

    group = PidsCgroup.create(64)       # None where no pids cgroup is writable
    ... the child writes its pid to group.procs before exec ...
    group.kill_all(); group.remove()
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import time
from pathlib import Path

_COUNTER = itertools.count()


def _candidates() -> list[Path]:
    """This process's cgroup in the cgroup v1 pids hierarchy and in cgroup v2, where mounted."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if fstype == "cgroup2" or (fstype == "cgroup" and "pids" in options):
            mounts.setdefault(fstype, fields[4])
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        kind = "cgroup" if "pids" in controllers.split(",") else "cgroup2" if controllers == "" else None
        if kind in mounts:
            out.append(Path(mounts[kind] + path))
    return out


@functools.cache
def _base() -> Path | None:
    """The first candidate under which a pids cgroup can be made (tried once per process)."""
    for base in _candidates():
        trial = base / f"qdlm-{os.getpid()}-trial"
        try:
            trial.mkdir()
        except OSError:
            continue
        try:
            (trial / "pids.max").write_text("1")
            return base
        except OSError:
            continue
        finally:
            trial.rmdir()
    return None


def available() -> bool:
    return _base() is not None


class PidsCgroup:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, limit: int) -> PidsCgroup | None:
        """A new cgroup of at most ``limit`` processes; None where none can be made."""
        base = _base()
        if base is None:
            return None
        path = base / f"qdlm-{os.getpid()}-{next(_COUNTER)}"
        path.mkdir()
        (path / "pids.max").write_text(str(limit))
        return cls(path)

    @property
    def procs(self) -> str:
        """The file a process writes its pid to, to join."""
        return str(self.path / "cgroup.procs")

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(self.procs).read_text().split()]
        return []

    def kill_all(self, seconds: float = 5.0) -> None:
        """SIGKILL every member until none is left (new ones forked meanwhile too)."""
        kill = self.path / "cgroup.kill"  # cgroup v2: one write kills them all
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        deadline = time.monotonic() + seconds
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        """Delete the (emptied) cgroup; a member still exiting delays it briefly."""
        for _ in range(200):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.01)

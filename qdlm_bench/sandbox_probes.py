"""Hostile programs for the code sandbox, each with a check of whether it got out.

    with probe_site(folder) as site:
        for probe in PROBES:
            outcome = run_probe(probe, site, run_program)   # {"probe", "status", "seconds", "escaped"}

Every target lives in ``site`` (a folder of the caller's, e.g. pytest's ``tmp_path``): a file to
create outside the program's directory, a folder to delete, a fake ``$HOME`` with ``.ssh/id_rsa``,
an environment secret held by a sibling process (``/proc/<pid>/environ``, as a harness's
``WANDB_API_KEY``), a listening socket on 127.0.0.1 and that sibling to kill. The fork storm and the
output are bounded in the program itself, so a probe that escapes does no harm to the machine.
Used by tests/test_sandbox_probes.py and ``python -m qdlm_bench.bench sandbox``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import resource
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FORKS = 300  # the storm's size: far over a sandbox's process limit (64), done in ~1 s


@dataclass
class Site:
    """The targets of one probe run (see the module docstring)."""

    folder: Path
    secret: str
    marker: str  # the daemon's `sleep` argument: finds it in /proc/*/cmdline
    listener: socket.socket
    holder: subprocess.Popen

    @property
    def outside(self) -> Path:
        return self.folder / "outside.txt"

    @property
    def victim(self) -> Path:
        return self.folder / "victim" / "data.txt"

    @property
    def home(self) -> Path:
        return self.folder / "home"

    @property
    def key(self) -> Path:
        return self.home / ".ssh" / "id_rsa"


@contextlib.contextmanager
def probe_site(folder: str | Path):
    """A ``Site`` in ``folder``, with ``$HOME`` and ``$QDLM_TEST_SECRET`` of this process set to its
    fake home and secret while it is open (the harness's side of the attacks)."""
    folder = Path(folder)
    secret, marker = "qdlm-secret-" + secrets.token_hex(8), f"301.{secrets.randbelow(10**6):06d}"
    for path, text in ((folder / "victim" / "data.txt", "mine"), (folder / "home" / ".ssh" / "id_rsa", secret)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    listener = socket.create_server(("127.0.0.1", 0))
    holder = subprocess.Popen(["sleep", "600"], env={**os.environ, "QDLM_TEST_SECRET": secret})
    saved = {k: os.environ.get(k) for k in ("HOME", "QDLM_TEST_SECRET")}
    os.environ.update(HOME=str(folder / "home"), QDLM_TEST_SECRET=secret)
    try:
        yield Site(folder, secret, marker, listener, holder)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        holder.kill()
        holder.wait()
        listener.close()


def _connected(site: Site) -> bool:
    site.listener.settimeout(0.3)
    try:
        conn, _ = site.listener.accept()
    except OSError:
        return False
    conn.close()
    return True


def _daemons(marker: str) -> list[int]:
    """Pids whose command line holds ``marker`` (the daemon's sleep)."""
    found = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if marker.encode() in Path(path).read_bytes():
                found.append(int(path.split("/")[2]))
    return found


def _daemon_left(site: Site) -> str | None:
    deadline = time.monotonic() + 1.0
    while (pids := _daemons(site.marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:  # clean up after an escape
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return f"daemon pid {pids[0]} still running after the program returned" if pids else None


@dataclass(frozen=True)
class Probe:
    """A hostile program (``program(site)``) and ``escaped(site, result, seconds, rss_mb)``: what got
    out (None: contained). ``always``: contained by every mode, ``none`` included."""

    name: str
    description: str
    program: Callable[[Site], str]
    escaped: Callable[..., str | None]
    always: bool = False


def _slow(seconds: float, timeout: float) -> str | None:
    return f"run_program returned after {seconds:.1f} s (timeout {timeout:g} s)" if seconds > timeout + 5 else None


PROBES: tuple[Probe, ...] = (
    Probe("write_outside", "os.system('touch <file outside its directory>')",
          lambda s: f"import os\nos.system('touch {s.outside}')\nopen({str(s.outside)!r}, 'a').close()\n",
          lambda s, r, sec, mb: f"created {s.outside}" if s.outside.exists() else None),
    Probe("delete_not_owned", "shutil.rmtree(<a folder it does not own>)",
          lambda s: f"import shutil\nshutil.rmtree({str(s.victim.parent)!r})\n",
          lambda s, r, sec, mb: None if s.victim.exists() else f"deleted {s.victim.parent}"),
    Probe("read_ssh_key", "read $HOME/.ssh/id_rsa of the harness's user",
          lambda s: f"import sys\nsys.stderr.write(open({str(s.key)!r}).read())\n",
          lambda s, r, sec, mb: "read the key" if s.secret in r.stderr else None),
    Probe("read_env_secret", "look for a secret in its environment and every /proc/<pid>/environ",
          lambda s: ("import glob, os, sys\n"
                     f"found = [k for k, v in os.environ.items() if v == {s.secret!r}]\n"
                     "for path in glob.glob('/proc/[0-9]*/environ'):\n"
                     "    try:\n"
                     f"        if {s.secret!r}.encode() in open(path, 'rb').read():\n"
                     "            found.append(path)\n"
                     "    except OSError:\n"
                     "        pass\n"
                     "sys.stderr.write(f'found in {found}')\nsys.exit(0 if found else 1)\n"),
          lambda s, r, sec, mb: r.stderr.strip().splitlines()[-1] if r.status == "passed" else None),
    Probe("network", "connect to a socket listening on 127.0.0.1",
          lambda s: ("import socket\n"
                     f"address = ('127.0.0.1', {s.listener.getsockname()[1]})\n"
                     "socket.create_connection(address, timeout=2).sendall(b'x')\n"),
          lambda s, r, sec, mb: "connected to 127.0.0.1" if _connected(s) else None),
    Probe("kill_process", "os.kill(<another process of the same user>, SIGKILL), as os.kill(os.getppid(), 9)",
          lambda s: f"import os, signal\nos.kill({s.holder.pid}, signal.SIGKILL)\n",
          lambda s, r, sec, mb: None if s.holder.poll() is None else f"killed pid {s.holder.pid}"),
    Probe("infinite_loop", "while True: pass",
          lambda s: "while True:\n    pass\n",
          lambda s, r, sec, mb: None if r.status == "timeout" else f"status {r.status}", always=True),
    Probe("fork_storm", f"fork {FORKS} sleeping children (their stdout and stderr closed)",
          lambda s: ("import os, sys, time\nn = 0\n"
                     f"for _ in range({FORKS}):\n"
                     "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
                     "    if pid == 0:\n        os.close(1)\n        os.close(2)\n"
                     "        time.sleep(5)\n        os._exit(0)\n    n += 1\n"
                     f"sys.stderr.write(f'forked {{n}}')\nsys.exit(0 if n == {FORKS} else 1)\n"),
          lambda s, r, sec, mb: f"forked {FORKS} processes" if r.status == "passed" else None),
    Probe("allocate_10gb", "bytearray(10 GiB)",
          lambda s: "x = bytearray(10 * 2**30)\n",
          lambda s, r, sec, mb: "allocated 10 GiB" if r.status == "passed" else None, always=True),
    Probe("daemon", "a double-forked setsid daemon (sleep 301) holding stderr",
          lambda s: ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                     f"        os.execvp('sleep', ['sleep', '{s.marker}'])\n    os._exit(0)\nos.wait()\n"),
          lambda s, r, sec, mb: _daemon_left(s), always=True),
    Probe("output_100mb", "write 100 MB to stdout and 100 MB to stderr",
          lambda s: ("import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n"
                     "    sys.stdout.write(chunk)\n    sys.stderr.write(chunk)\n"),
          lambda s, r, sec, mb: (f"harness memory grew {mb:.0f} MB, {len(r.stderr)} characters of stderr kept"
                                 if mb > 50 or len(r.stderr) > 2**16 else None), always=True),
)


def run_probe(probe: Probe, site: Site, run: Callable, timeout: float = 3.0) -> dict:
    """Run ``probe`` with ``run(program, timeout=...)`` (``code_exec.run_program`` or another):
    {"probe", "status", "seconds", "escaped"} (``escaped``: what got out, else None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    result = run(probe.program(site), timeout=timeout)
    seconds = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    escaped = [e for e in (probe.escaped(site, result, seconds, grown_mb), _slow(seconds, timeout)) if e]
    return {"probe": probe.name, "status": result.status, "seconds": round(seconds, 2),
            "escaped": "; ".join(escaped) or None}

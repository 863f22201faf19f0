"""Sandbox modes for model-generated programs (``eval.code_sandbox``): detection, command lines.

=========  ===========================================================================================
mode       what a program gets (``qdlm_bench.code_exec`` adds, in every mode: address space, CPU
           time, file size (output) and open-file limits, a wall-clock timeout, a scrubbed
           environment, and every process it started killed when it ends or times out)
=========  ===========================================================================================
bwrap      bubblewrap: new user, PID, network (loopback only), IPC, UTS and cgroup namespaces; the
           filesystem read-only except its own directory; /tmp, /var/tmp, /run, /home, /root and
           $HOME replaced by empty folders (Python's install bound back read-only); a new /proc and
           /dev; no capabilities; uid 65534; a new session; ``MAX_PROCS`` processes.
unshare    util-linux ``unshare`` (no bubblewrap needed, unprivileged user namespaces): the same
           namespaces, mounts and process limit, set up by ``sandbox_unshare.py`` inside them; the
           program runs as root of its user namespace with every capability dropped (uid 0 there
           maps to the caller's uid outside; it owns nothing more than the caller does).
none       no isolation (``sandbox_reaper.py`` only sweeps the processes it leaves behind): the
           program can read, write and connect to whatever its user can. Opt-in only; warns once.
=========  ===========================================================================================

``auto`` takes the first of bwrap, unshare that works here (``available``), never ``none``.
The process limit is ``RLIMIT_NPROC`` set inside the new user namespace, where it counts only
the sandbox's processes (Linux >= 5.14); root is exempt from it, so for root a pids cgroup
(``sandbox_cgroup``) bounds it where one is writable, and nothing does where none is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("auto", "bwrap", "unshare", "none")
STRONGEST_FIRST = ("bwrap", "unshare")
MAX_PROCS = 64
HIDDEN = ("/tmp", "/var/tmp", "/run", "/home", "/root")  # with $HOME and the user's home directory
SANDBOX_UID = 65534
INSTALL = "sudo apt-get install bubblewrap"
_HERE = Path(__file__).resolve().parent
log = logging.getLogger("qdlm_bench")


def hidden_dirs() -> list[str]:
    """Folders replaced by empty ones in the bwrap and unshare modes (the existing ones)."""
    homes = [os.environ.get("HOME", ""), pwd.getpwuid(os.getuid()).pw_dir]
    dirs = {os.path.realpath(d) for d in (*HIDDEN, *homes) if d and os.path.isdir(d)} - {"/"}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))  # outermost only


def python_dirs() -> list[str]:
    """Python's install folders (bound back read-only when a hidden folder holds them)."""
    executable_dir = os.path.dirname(os.path.realpath(sys.executable))
    return sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, executable_dir)})


def environment(work: str) -> dict[str, str]:
    """The program's whole environment."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0"}


def command(mode: str, work: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` (e.g. ``[python, "-I", "program.py"]``) in ``mode``,
    with ``work`` (the program's directory) as its only writable folder."""
    if mode == "bwrap":
        args = ["bwrap", "--unshare-all", "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
                "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--ro-bind", "/", "/",
                "--proc", "/proc", "--dev", "/dev"]
        for d in hidden_dirs():
            args += ["--tmpfs", d]
        for d in python_dirs():
            args += ["--ro-bind", d, d]
        args += ["--bind", work, work, "--chdir", work, "--clearenv"]
        for key, value in environment(work).items():
            args += ["--setenv", key, value]
        return [*args, "prlimit", f"--nproc={MAX_PROCS}", "--", *argv]
    if mode == "unshare":
        setup = [sys.executable, "-I", "-S", str(_HERE / "sandbox_unshare.py"), "--work", work,
                 "--nproc", str(MAX_PROCS)]
        for d in hidden_dirs():
            setup += ["--hide", d]
        for d in python_dirs():
            setup += ["--keep", d]
        return ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--mount",
                "--ipc", "--uts", "--kill-child", "--", *setup, "--", *argv]
    if mode == "none":
        return [sys.executable, "-I", "-S", str(_HERE / "sandbox_reaper.py"), "--", *argv]
    raise ValueError(f"unknown sandbox mode {mode!r}; choose one of {', '.join(MODES)}")


@functools.cache
def missing(mode: str) -> str | None:
    """Why ``mode`` cannot run here (None: it can): a tool not installed, or its trial program failed."""
    tools = {"bwrap": ("bwrap", "prlimit"), "unshare": ("unshare",), "none": ()}[mode]
    absent = [t for t in tools if shutil.which(t) is None]
    if absent:
        return f"{' and '.join(absent)} not found on PATH"
    with tempfile.TemporaryDirectory(prefix="qdlm_sandbox_") as work:
        try:
            out = subprocess.run(command(mode, work, [sys.executable, "-I", "-c", "pass"]), cwd=work, timeout=30,
                                 stdin=subprocess.DEVNULL, capture_output=True, env=environment(work))
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"its trial program did not run ({err})"
    if out.returncode:
        return f"its trial program failed: {out.stderr.decode(errors='replace').strip()[-300:]}"
    return None


def available() -> list[str]:
    """The sandboxing modes that work here, strongest first."""
    return [m for m in STRONGEST_FIRST if missing(m) is None]


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"eval.code_sandbox={mode!r} is not a sandbox mode; choose one of {', '.join(MODES)}")


def resolve(mode: str) -> str:
    """The mode ``mode`` runs programs with: ``auto`` the strongest available, else ``mode`` itself.
    Raises ValueError when it cannot run here (``auto``: when no sandbox can), saying what to do."""
    check_mode(mode)
    if mode == "auto":
        found = available()
        if not found:
            reasons = "; ".join(f"{m}: {missing(m)}" for m in STRONGEST_FIRST)
            raise ValueError(f"eval.code_sandbox=auto found no sandbox for generated code ({reasons}). Install "
                             f"bubblewrap ({INSTALL}), or run the programs unisolated with eval.code_sandbox=none")
        _announce(found[0])
        return found[0]
    reason = missing(mode)
    if reason:
        raise ValueError(f"eval.code_sandbox={mode} cannot run here: {reason}"
                         + (f" (install: {INSTALL})" if mode == "bwrap" else ""))
    return mode


@functools.cache
def _announce(mode: str) -> None:
    """Once per process: the mode ``auto`` chose."""
    log.info("eval.code_sandbox=auto: generated programs run in %s (available here: %s)", mode, ", ".join(available()))


_configured = "auto"


def configured() -> str:
    """The mode of this process's programs (``using``); ``auto`` by default."""
    return _configured


@contextlib.contextmanager
def using(mode: str):
    """Run the programs of this process in ``mode`` while the block runs (harness.run sets the run's)."""
    global _configured
    check_mode(mode)
    saved, _configured = _configured, mode
    try:
        yield resolve(mode)
    finally:
        _configured = saved


@functools.cache
def warn_unsandboxed() -> None:
    """Once per process: programs run with no sandbox."""
    log.warning("eval.code_sandbox=none: model-generated programs run WITHOUT a sandbox; they can read, write, "
                "delete and connect to whatever this user can (install bubblewrap: %s)", INSTALL)

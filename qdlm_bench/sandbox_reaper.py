"""Run a program as a child subreaper, then kill whatever it left (``eval.code_sandbox=none``).

    python -I sandbox_reaper.py -- PROGRAM [ARG ...]

A process the program starts re-parents to this one when its own parent dies (a double-forked
daemon that left the program's session too: ``PR_SET_CHILD_SUBREAPER``). When the program exits,
or this process gets SIGTERM (the harness's timeout), every child left is killed and reaped.
Exits with the program's status. A program that kills this process (its parent) escapes it:
``none`` is no sandbox. Standard library only; runs as a script.
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


class Terminated(Exception):
    pass


def _terminated(signum, frame):
    raise Terminated


def _children() -> list[int]:
    """Live (not zombie) children of this process."""
    me, found = str(os.getpid()), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, ppid = f.read().rpartition(")")[2].split()[:2]
        except (OSError, ValueError):
            continue
        if ppid == me and state != "Z":
            found.append(int(pid))
    return found


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def sweep() -> None:
    """Kill and reap every child until none is left (orphans keep re-parenting here meanwhile)."""
    while True:
        _reap()
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)


def main(argv: list[str]) -> int:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"sandbox_reaper: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
    signal.signal(signal.SIGTERM, _terminated)
    status = 1
    try:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.execv(argv[0], argv)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except Terminated:
        status = 124
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sweep()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[sys.argv.index("--") + 1:]))

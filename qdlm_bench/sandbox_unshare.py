"""Set up the ``unshare`` sandbox from inside its namespaces, then exec the program (sandbox.py).

    unshare --user --map-root-user --net --pid --fork --mount-proc --mount ... -- \\
        python -I sandbox_unshare.py --work DIR --nproc N [--hide DIR ...] [--keep DIR ...] -- PROGRAM ...

Runs as root of the new user namespace, in its own mount namespace: puts an empty tmpfs over each
``--hide`` folder, binds back each ``--keep`` folder (Python's install) and the program's
``--work`` folder, makes every mount read-only except ``--work``, sets ``RLIMIT_NPROC`` (it
counts the processes of this user namespace), drops every capability (bounding, inheritable and
ambient sets; no_new_privs), so the program can undo none of it, and execs the program.
Standard library only; runs as a script.
"""

import argparse
import ctypes
import os
import resource

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
MS_NOSUID, MS_NODEV = 2, 4
KEPT_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _bytes(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)),
           f"mount {target}")


def mount_points() -> list[tuple[str, int]]:
    """(mount point, its flags a remount must keep) of every mount, parents first."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 etc.
            out.append((point, sum(KEPT_FLAGS.get(o, 0) for o in fields[5].split(","))))
    return out


def drop_capabilities() -> None:
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the last capability
    _check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
    _check(libc.capset(header, data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--hide", action="append", default=[])
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    binds = {d: os.open(d, os.O_PATH) for d in (*args.keep, args.work)}  # reachable once hidden
    for d in args.hide:
        mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for d, fd in binds.items():
        os.makedirs(d, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", d, None, MS_BIND | MS_REC)
    work = os.path.realpath(args.work)
    for point, flags in mount_points():
        if point != work:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    for fd in binds.values():
        os.close(fd)
    os.chdir(work)
    resource.setrlimit(resource.RLIMIT_NPROC, (args.nproc, args.nproc))
    drop_capabilities()
    os.execv(args.argv[0], args.argv)


if __name__ == "__main__":
    main()

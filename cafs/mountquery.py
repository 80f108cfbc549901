"""Asking a running cafs mount for an attribute of its root, in bounded time.

``root_xattr(path, name, timeout)`` reads extended attribute ``name`` of the cafs mount
at ``path`` (its mountpoint). Whether a cafs mount is there is found in the mount table
(``cafs.mounttable``) without touching the path; only then is the root asked, in a
thread of its own, because the kernel hands the request to the daemon and waits for its
answer as long as the daemon lives: a daemon that is stopped (SIGSTOP, a debugger) or
hung would hold the caller forever, and one that is gone leaves a mount that answers
ENOTCONN.

Returns None when no cafs mount is at ``path``. Raises ``MountNotAnswering`` (a
``CafsError``) naming the mount, what is wrong and how to unmount it.

Caveat: the thread that waits is left behind when the time is up; it ends with the
process (the kernel's wait for a FUSE answer ends on a fatal signal, which the exit of
the process is).
"""

from __future__ import annotations

import errno
import os
import threading

from cafs.errors import CafsError
from cafs.mounttable import CAFS_FSTYPE, top_mount


class MountNotAnswering(CafsError):
    """A cafs mount is there but does not answer: its daemon is gone, stopped or hung."""


def root_xattr(path: str, name: str, timeout: float) -> bytes | None:
    """Attribute ``name`` of the root of the cafs mount at ``path``; None if no cafs mount
    is at ``path``."""
    where = _as_mounted(path)
    entry = top_mount(where)
    if entry is None or entry.fstype != CAFS_FSTYPE:
        return None
    answer: list[bytes | OSError] = []

    def ask() -> None:
        try:
            answer.append(os.getxattr(where, name))
        except OSError as exc:
            answer.append(exc)

    asking = threading.Thread(target=ask, name="cafs-mount-query", daemon=True)
    asking.start()
    asking.join(timeout)
    if asking.is_alive():
        raise MountNotAnswering(f"{path}: the cafs mount did not answer within {timeout:g} s "
                                f"({_daemon(where)}); unmount it: cafs umount {path}")
    got = answer[0]
    if isinstance(got, OSError):
        if got.errno == errno.ENOTCONN:
            raise MountNotAnswering(f"{path}: the cafs mount's daemon is gone ({got.strerror}); "
                                    f"unmount it: cafs umount {path}")
        raise MountNotAnswering(f"{path}: cannot read {name} of the cafs mount: {got.strerror}")
    return got


def _as_mounted(path: str) -> str:
    """``path`` as the mount table names a mountpoint (absolute, symlinks resolved),
    without touching ``path`` itself: only its parent is resolved."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _daemon(mountpoint: str) -> str:
    """The daemons serving ``mountpoint`` and their states, for a message."""
    from cafs.mountd import mountpoint_of

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        served = mountpoint_of(cmdline)
        if served is not None and _as_mounted(served) == mountpoint:
            found.append(f"its daemon, pid {pid}, is {'stopped' if state in 'tT' else 'hung or busy'}")
    return "; ".join(found) or "no daemon of this host serves it"

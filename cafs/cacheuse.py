"""Who has a repository's cache open on this host, so that ``cafs cache clear`` never
deletes one in use.

Every process that opens the cache of a repository (through ``MetaCache``: a mount, an
import, a prefetch, ``cafs cache status``) holds a shared ``flock`` on
``<cache dir>/<repo id>/in-use`` for as long as it has the cache open (``hold``).
``clear`` takes the locks of the caches it is to delete exclusively, without waiting.
If one is taken, that cache is in use and nothing is deleted: ``CacheInUse`` carries the
PIDs of the holders. Else it renames each directory aside (``.cleared-*``) while holding
the locks, then deletes them: no process ever opens a half-deleted cache, and none keeps
writing into deleted files. A process that opened a lock file just before the rename
finds, once it holds the lock, that the path names another file (or none), and takes
the lock again on a fresh one.

The kernel drops the locks of a process that ends, even by ``kill -9``, so a lock is
never stale. Holders are found in ``/proc/locks``; where it cannot be read the PIDs are
unknown, and the cache is still refused.

A process of a cafs older than this lock does not take it: a mount started before an
upgrade, still serving. ``clear`` finds those by LMDB's own lock instead: every process
with ``meta.lmdb`` open, of any cafs, holds a POSIX read lock on the first byte of
``meta.lmdb/lock.mdb`` (LMDB's test for being alone), so ``clear`` also takes that byte
exclusively, without waiting, and holds it until the cache is renamed aside.

Caveats: ``flock`` and POSIX locks are local to a host, which is all a cache is meant
for; a cache directory shared by hosts over a network filesystem is not protected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import ExitStack
from pathlib import Path

from cafs import cachedir
from cafs.errors import CafsError

LOCK_NAME = "in-use"
MAKE_TRIES = 100  # a directory cleared as fast as it is made, again and again, is no race
ASIDE_PREFIX = ".cleared-"  # dot first: never taken for a repository's cache


class CacheInUse(CafsError):
    """Caches to delete are open in other processes: ``users`` maps each such cache to
    the PIDs holding it (empty if they cannot be told)."""

    def __init__(self, users: dict[Path, list[int]]) -> None:
        super().__init__(f"in use: {', '.join(map(str, users))}")
        self.users = users


def hold(root: Path) -> int:
    """Take the shared lock of the cache at ``root``, creating the directory; returns
    the descriptor whose closing releases it. Raises OSError for a directory that cannot
    be made (a path through a dangling symlink, say, or under /proc), ``UnsafeCacheDir``
    for one another user could write in (``cafs.cachedir``)."""
    cachedir.check_tree(root)  # one line for all of a cache an older cafs made (umask 002)
    tries = 0
    while True:
        try:
            cachedir.private(root)
            fd = os.open(root / LOCK_NAME, os.O_RDONLY | cachedir.CREATE_FLAGS, cachedir.FILE_MODE)
        except (FileExistsError, FileNotFoundError):
            tries += 1
            if tries < MAKE_TRIES and (root.is_dir() or not root.exists()):
                continue  # made by another process and cleared at once: make it again
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if _names(root / LOCK_NAME, fd):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # locked a file a clear has moved away


def clear(roots: list[Path]) -> None:
    """Delete the caches at ``roots``; if any is in use, raise ``CacheInUse`` naming
    every one that is, and delete none."""
    asides = []
    with ExitStack() as stack:
        users: dict[Path, list[int]] = {}
        for root in roots:
            fd = os.open(root / LOCK_NAME, os.O_RDONLY | cachedir.CREATE_FLAGS, cachedir.FILE_MODE)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                users[root] = holders(fd)
                continue
            lmdb_users = _lmdb_users(root, stack)
            if lmdb_users is not None:
                users[root] = lmdb_users
        if users:
            raise CacheInUse(users)
        for root in roots:  # while every lock is held
            asides.append(root.with_name(f"{ASIDE_PREFIX}{root.name}-{os.getpid()}"))
            os.rename(root, asides[-1])
    for aside in asides:
        shutil.rmtree(aside)


def remove_leftovers(cache_dir: Path) -> None:
    """Delete what clears that were killed midway left (no process can have it open)."""
    for path in cache_dir.glob(f"{ASIDE_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def _lmdb_users(root: Path, stack: ExitStack) -> list[int] | None:
    """None if no process has the LMDB file of the cache at ``root`` open (its first byte
    is now locked, until ``stack`` closes), else the PIDs that do (see the module
    docstring)."""
    try:
        fd = os.open(root / "meta.lmdb" / "lock.mdb", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # nobody has it open: LMDB makes the file at open
    stack.callback(os.close, fd)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return holders(fd, "POSIX")
    return None


def holders(fd: int, kind: str = "FLOCK") -> list[int]:
    """PIDs holding a lock of ``kind`` (FLOCK or POSIX) on the file open at ``fd``, from
    ``/proc/locks``."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = set()
    for line in lines:
        # "3: FLOCK  ADVISORY  READ 4793 fe:00:2434077 0 EOF"; a waiter has "->" after "3:"
        fields = line.split()
        if len(fields) > 5 and fields[1] == kind and fields[5] == inode and fields[4].isdigit():
            pids.add(int(fields[4]))
    return sorted(pids)


def _names(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

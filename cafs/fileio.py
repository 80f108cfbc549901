"""Small file I/O helpers shared by the modules that read and write data files.

``pwrite_all`` writes a whole buffer at an offset, looping over short writes (``pwrite``
may write less than asked, e.g. on a signal or near a quota). ``read_resident`` reads a
range only if the page cache holds all of it (``RWF_NOWAIT``: it never waits for a disk,
so an event loop may call it). ``open_files_share`` bounds the pools of descriptors kept
open by the open-files limit. ``DIRECT_ALIGN`` is the alignment used for ``O_DIRECT``
offsets, lengths and buffers: a multiple of any logical block size in use (512 or 4096
bytes). ``raise_open_files_limit`` lifts the process's soft limit of open files to its
hard limit. ``cwd_gone`` tells a deleted working directory (where a relative path names
nothing, and ``os.getcwd`` fails with an ENOENT that names no file) from other errors,
for the command edges to say so; ``CWD_GONE`` is what they say.
"""

from __future__ import annotations

import os
import resource

DIRECT_ALIGN = 4096
CWD_GONE = "the current directory was deleted, so relative paths name nothing: cd elsewhere or give absolute paths"


def cwd_gone() -> bool:
    """Whether this process's working directory has been deleted."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


NR_OPEN = 1 << 20  # the kernel's default ceiling (fs.nr_open), for an unlimited hard limit


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit, as far as the
    kernel allows; returns the soft limit in force afterwards.

    A mount keeps pack files of its cache open, and get keeps a share of the limit in
    hard-linked files open to link to; the walks of import and get hold a bounded number
    of directories (``cafs.dirfds``). restic and casync, in Go and C, raise theirs too.
    Children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass  # a ceiling below the hard limit: keep what we have
    return soft


def open_files_share(fraction: int, least: int = 4) -> int:
    """``1/fraction`` of this process's soft limit of open files, at least ``least``: the
    most descriptors a pool that keeps files open between uses may hold, so that pools
    sized for a generous limit do not take every descriptor under a low one (``ulimit -n``
    with a low hard limit, which ``raise_open_files_limit`` cannot lift) and leave opens
    elsewhere failing with EMFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = NR_OPEN
    return max(least, soft // fraction)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def read_resident(fd: int, offset: int, length: int) -> bytearray | None:
    """``length`` bytes at ``offset`` if the page cache holds them all; None if it does
    not (EAGAIN), if the file is shorter, or if such reads are refused here."""
    buf = bytearray(length)
    try:
        if os.preadv(fd, [buf], offset, os.RWF_NOWAIT) != length:
            return None
    except OSError:
        return None
    return buf

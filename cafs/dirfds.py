"""A walk down a directory tree through a bounded number of open directories.

Import reads a tree and get writes one through directory descriptors, one per level, so
that no path is resolved twice and no symlink is ever followed. A tree may be deeper
than the process may hold descriptors (``ulimit -n 1024`` sets the hard limit too, and a
tree can be nested tens of thousands deep), so a walk keeps only the directories of its
deepest ``OPEN_DIRS`` levels open (``close_above``) and marks those above ``CLOSED``.
Going back up to a closed one, it opens ``..`` of the directory it leaves, which is
never a symlink, and takes it only if it is still the directory it left
(``open_parent``: same ``st_dev`` and ``st_ino``). When it is not (the directory left
was moved elsewhere meanwhile), ``open_below`` finds it again by its names below an
open directory, if it is still there; else the walker decides.

Raises only what ``os`` raises.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Protocol

OPEN_DIRS = 64  # levels of a walk whose directories are held open
CLOSED = -1  # the descriptor of a level above those


class Level(Protocol):
    """One level of a walk: its directory's descriptor, or ``CLOSED``."""

    fd: int


def close_above(stack: Sequence[Level], first: int = 0) -> None:
    """Call after pushing a level: close the directory of the level that push moved out
    of the deepest ``OPEN_DIRS``, unless it is above ``first`` (a caller's own)."""
    i = len(stack) - 1 - OPEN_DIRS
    if i >= first and stack[i].fd != CLOSED:
        os.close(stack[i].fd)
        stack[i].fd = CLOSED


def open_parent(child_fd: int, parent: tuple[int, int]) -> int | None:
    """Open the directory holding the open directory ``child_fd`` if it is still
    ``parent`` (``st_dev, st_ino``); None if the child was moved elsewhere since."""
    return _if_same(os.open("..", _DIR, dir_fd=child_fd), parent)


def open_below(top_fd: int, names: Sequence[bytes], want: tuple[int, int]) -> int | None:
    """Open the directory ``top_fd/names[0]/names[1]/...`` (never through a symlink) if
    it is ``want`` (``st_dev, st_ino``); None if it is not, or no longer there. The
    slow way back (a descriptor per level on the way) when ``open_parent`` says the
    subdirectory left was moved elsewhere; raises other OSErrors (EACCES, say)."""
    fd = os.dup(top_fd)
    try:
        for name in names:
            sub = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = sub
    except (FileNotFoundError, NotADirectoryError):
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.ELOOP:  # a symlink now: not it
            return None
        raise
    return _if_same(fd, want)


_DIR = os.O_RDONLY | os.O_DIRECTORY


def _if_same(fd: int, want: tuple[int, int]) -> int | None:
    """``fd`` if it is the file ``want`` (``st_dev, st_ino``); else None, ``fd`` closed."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != want:
        os.close(fd)
        return None
    return fd

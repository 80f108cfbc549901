"""Small file I/O helpers shared by the modules that read and write data files.

``pwrite_all`` writes a whole buffer at an offset, looping over short writes (``pwrite``
may write less than asked, e.g. on a signal or near a quota). ``read_resident`` reads a
range only if the page cache holds all of it (``RWF_NOWAIT``: it never waits for a disk,
so an event loop may call it). ``DIRECT_ALIGN`` is the alignment used for ``O_DIRECT``
offsets, lengths and buffers: a multiple of any logical block size in use (512 or 4096
bytes).
"""

from __future__ import annotations

import os

DIRECT_ALIGN = 4096


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

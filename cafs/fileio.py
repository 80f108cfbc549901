"""Small file-writing helpers shared by the modules that write data files.

``pwrite_all`` writes a whole buffer at an offset, looping over short writes (``pwrite``
may write less than asked, e.g. on a signal or near a quota). ``DIRECT_ALIGN`` is the
alignment used for ``O_DIRECT`` offsets, lengths and buffers: a multiple of any logical
block size in use (512 or 4096 bytes).
"""

from __future__ import annotations

import os

DIRECT_ALIGN = 4096


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

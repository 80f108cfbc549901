"""Cutting a sparse file into chunks without reading or hashing its holes.

Contract: ``cut(cdc, fd, size, holes)`` yields, in file order, pyfastcdc ``Chunk``s and
``ZeroRun``s, which together are exactly the chunks FastCDC gives for the file's bytes
read from start to end: a ``ZeroRun(count)`` stands for ``count`` consecutive chunks of
``cdc``'s maximum size, all zero bytes. So a sparse file and a dense copy of it are
stored as the same chunks, and a hole of a terabyte costs a few seeks.

Why the two agree:

- FastCDC starts afresh at every cut point: the chunks after a cut depend only on the
  bytes after it. So the file can be cut in pieces, each started at a cut point.
- A chunk that starts in ``max_size`` or more zero bytes ends after exactly ``max_size``
  bytes, when no cut point can be found in zeros. That depends on the chunker's gear
  table and masks, so ``zeros_cut_at_max`` checks it on a buffer of zeros; callers use
  ``cut`` only when it holds.
- Holes (from ``SEEK_HOLE``/``SEEK_DATA``) of at least ``2 * max_size`` bytes are used;
  shorter ones are read like data. In such a hole, the first cut point at or after the
  hole's start comes less than ``max_size`` bytes later (no chunk is longer), so at
  least ``max_size`` zero bytes follow it. From there the zeros are whole chunks of
  ``max_size`` up to less than ``max_size`` before the hole's end, where reading resumes.

Holes read as zeros, so the spans describe the file's bytes whatever the chunker does;
the checks above only keep deduplication between sparse and dense copies intact. A file
changed while it is cut is the caller's to detect (size and mtime before and after).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyfastcdc import Chunk, FastCDC


@dataclass(frozen=True)
class ZeroRun:
    count: int  # chunks of the chunker's maximum size, all zero bytes


def holes(fd: int, size: int, min_length: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each hole of at least ``min_length`` bytes in the first
    ``size`` bytes of ``fd``, in order; empty where the filesystem reports none. Leaves
    the file position at 0."""
    found: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            start = os.lseek(fd, pos, os.SEEK_HOLE)
            if start >= size:
                break
            try:
                end = min(os.lseek(fd, start, os.SEEK_DATA), size)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                end = size  # no data after the hole
            if end - start >= min_length:
                found.append((start, end))
            pos = end
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
            raise
        found = []  # no SEEK_HOLE here, or the file shrank: read it all
    os.lseek(fd, 0, os.SEEK_SET)
    return found


def zeros_cut_at_max(cdc: FastCDC, max_size: int) -> bool:
    """Whether ``cdc`` cuts a run of zeros into chunks of exactly ``max_size``."""
    lengths = [c.length for c in cdc.cut_buf(bytes(2 * max_size + 1))]
    return lengths[:2] == [max_size, max_size]


def cut(cdc: FastCDC, fd: int, max_size: int, hole_list: list[tuple[int, int]]) -> Iterator[Chunk | ZeroRun]:
    """The chunks of the file at ``fd`` (read from offset 0), with ``ZeroRun``s in
    ``hole_list``'s holes (each at least ``2 * max_size`` long, as ``holes`` gives them
    for that ``min_length``)."""
    pos = 0
    for start, end in hole_list:
        os.lseek(fd, pos, os.SEEK_SET)
        for chunk in cdc.cut_stream(FdReader(fd)):
            yield chunk
            pos += chunk.length
            if pos >= start:
                break
        else:
            return  # the file ended early: the caller sees the short total
        count = (end - pos) // max_size
        if count > 0:
            yield ZeroRun(count)
            pos += count * max_size
    os.lseek(fd, pos, os.SEEK_SET)
    yield from cdc.cut_stream(FdReader(fd))


class FdReader:
    """A minimal reader over a file descriptor for FastCDC's ``cut_stream``."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readinto(self, buf: memoryview) -> int:
        return os.readv(self.fd, [buf])

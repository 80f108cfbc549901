"""Preparing an import's chunks on worker threads: reading, cutting, hashing, compressing.

Why: one thread reading, cutting, hashing and compressing keeps one core busy; the
import is bound by that thread while the others idle (DESIGN.md: keep every core busy).
Each step here runs in C with the GIL released (``os.readv``, pyfastcdc's cut, BLAKE3,
zstd), so threads run them side by side. What must stay in one order, the dedup lookup
and the packs (a directory's files in name order), stays with the caller.

Contract:

- ``ChunkPrep.file(fd, size)`` reads a whole file of ``size`` bytes (one byte more, so a
  file that grew is seen), cuts it, and prepares each chunk, on a worker; the result is a
  ``FileCut``: the prepared chunks in file order and the file's ``fstat`` after the read.
  The caller owns ``fd`` (opens it, closes it once the job is done or cancelled) and must
  ``release`` the ``FileCut`` once it no longer uses its chunks' bytes (they may be views
  of a read buffer that is then reused); ``release`` drops the chunks.
- ``ChunkPrep.in_order(items)`` prepares a stream of chunks (a large file cut on the
  calling thread) on the workers and yields them in the stream's order, with at most
  ``window`` in flight; ``ZeroRun``s pass through. The stream's chunk bytes are copied
  before they are handed over, so the stream may reuse its buffer.
- A ``Prepared`` chunk carries its id and length, and its stored form (codec and bytes)
  unless ``known`` (the repository's object index, read without a lock: an id in it
  stays there) held the id when it was prepared; the caller stores the chunk only if its
  index still lacks the id when it commits it.
- At most ``window`` whole-file jobs hold a read buffer at once: ``file`` waits for a
  free buffer, so callers keep fewer jobs than that in flight (``window``). The read
  buffers hold at most ``buffer_bytes`` in all, or, if more, what the jobs in flight
  need (each its file's size and a byte, rounded up to ``GRANULE``): the caller bounds
  memory by bounding the sizes of the files it has in flight.
- ``close`` cancels what has not started and waits for what has.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Container, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from cafs.ids import digest
from cafs.sparse import ZeroRun

if TYPE_CHECKING:
    from pyfastcdc import Chunk, FastCDC

    from cafs.codec import Compressor

MAX_WORKERS = 8  # past this, the thread that orders and packs the chunks is the limit
GRANULE = 256 << 10  # read buffers grow in steps of this, so files of about one size share them


class Prepared(NamedTuple):
    oid: bytes
    length: int
    codec: int
    stored: bytes | memoryview | None  # None: the index held ``oid`` already


class FileCut:
    """A whole file read and cut on a worker: its chunks, or the error reading it."""

    def __init__(self, chunks: list[Prepared], after: os.stat_result | None, error: OSError | None,
                 buffer: ReadBuffer | None, pool: _BufferPool) -> None:
        self.chunks = chunks
        self.after = after  # fstat once read, None if reading failed
        self.error = error
        self._buffer = buffer
        self._pool = pool

    def release(self) -> None:
        """Give the read buffer back and let go of the chunks: their bytes are not to be
        used after this. The job's Future keeps this FileCut as long as the caller keeps
        the job (an importer: until the file's directory is done), so the chunks' stored
        bytes must not stay with it, or a directory's compressed data stays in memory."""
        self.chunks = []
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            self._pool.give(buffer)


class ReadBuffer:
    """A buffer whole files are read into, reused from file to file: a new bytes object
    per file would be fresh memory each time, and on a VM that hands freed memory back
    to its host, fresh pages cost more than the copy itself (benchmarks/README.md)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def read(self, fd: int, n: int) -> memoryview:
        """Up to ``n`` bytes from ``fd``'s current position, fewer only at end of file."""
        if len(self._buf) < n:
            self._buf = bytearray(_rounded(n))  # no more: the pool bounds what all buffers hold
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = os.readv(fd, [view[got:]])
            if k == 0:
                break
            got += k
        return view[:got]

    def empty(self) -> None:
        """Let go of the memory (views handed out keep it until they go)."""
        self._buf = bytearray()


def _rounded(n: int) -> int:
    return -(-n // GRANULE) * GRANULE


def _capacity(buffer: ReadBuffer) -> int:
    return buffer.capacity


class _BufferPool:
    """``size`` read buffers that hold at most ``limit`` bytes in all, or what the reads
    in progress need if that is more. A read of ``n`` bytes takes a free buffer that holds
    them if there is one, else the largest (it grows least), and free buffers are emptied,
    largest first, while the buffers would hold more than ``limit``: each kept the
    largest file it had read, doubled, so ``size`` buffers came to hold twice
    WHOLE_READ_MAX each, several times what the importer lets be in flight."""

    def __init__(self, size: int, limit: int) -> None:
        self._free = [ReadBuffer() for _ in range(size)]
        self._held = dict.fromkeys(self._free, 0)  # what each holds, or will once its read grows it
        self._limit = limit
        self._cond = threading.Condition()

    def take(self, n: int) -> ReadBuffer:
        """A buffer to read ``n`` bytes into; waits for a free one."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            fits = [b for b in self._free if b.capacity >= n]
            buffer = min(fits, key=_capacity) if fits else max(self._free, key=_capacity)
            self._free.remove(buffer)
            self._held[buffer] = max(buffer.capacity, _rounded(n))
            excess = sum(self._held.values()) - self._limit
            for idle in sorted(self._free, key=_capacity, reverse=True):
                if excess <= 0:
                    break
                excess -= self._held[idle]
                idle.empty()
                self._held[idle] = 0
            return buffer

    def give(self, buffer: ReadBuffer) -> None:
        with self._cond:
            self._held[buffer] = buffer.capacity
            self._free.append(buffer)
            self._cond.notify()


class ChunkPrep:
    def __init__(self, cdc: FastCDC, known: Container[bytes], buffer_bytes: int,
                 workers: int | None = None) -> None:
        self.workers = max(1, min(workers or len(os.sched_getaffinity(0)), MAX_WORKERS))
        self.window = 2 * self.workers + 2  # jobs in flight: the workers never wait on the caller
        self._cdc = cdc
        self._known = known
        self._buffers = _BufferPool(self.window, buffer_bytes)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cafs-cut")

    def file(self, fd: int, size: int) -> Future[FileCut]:
        buffer = self._buffers.take(size + 1)
        try:
            return self._pool.submit(self._cut_file, fd, size, buffer)
        except BaseException:
            self._buffers.give(buffer)
            raise

    def in_order(self, items: Iterable[Chunk | ZeroRun]) -> Iterator[Prepared | ZeroRun]:
        ahead: deque[Future[Prepared] | ZeroRun] = deque()
        try:
            for item in items:
                if isinstance(item, ZeroRun):
                    ahead.append(item)
                else:
                    ahead.append(self._pool.submit(self._prepare, bytes(item.data)))
                while len(ahead) > self.window:
                    yield _done(ahead.popleft())
            while ahead:
                yield _done(ahead.popleft())
        finally:
            for left in ahead:
                if not isinstance(left, ZeroRun):
                    left.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- on the workers -----------------------------------------------------------

    def _cut_file(self, fd: int, size: int, buffer: ReadBuffer) -> FileCut:
        try:
            data = buffer.read(fd, size + 1)
            chunks = [self._prepare(c.data) for c in self._cdc.cut_buf(data)]
            return FileCut(chunks, os.fstat(fd), None, buffer, self._buffers)
        except OSError as exc:
            self._buffers.give(buffer)
            return FileCut([], None, exc, None, self._buffers)
        except BaseException:
            self._buffers.give(buffer)
            raise

    def _prepare(self, data: bytes | memoryview) -> Prepared:
        oid = digest(data)
        if oid in self._known:
            return Prepared(oid, len(data), 0, None)
        codec, stored = self._compressor().encode(data)
        return Prepared(oid, len(data), codec, stored)

    def _compressor(self) -> Compressor:
        compressor: Compressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            from cafs.codec import Compressor
            compressor = self._local.compressor = Compressor()
        return compressor


def _done(item: Future[Prepared] | ZeroRun) -> Prepared | ZeroRun:
    return item if isinstance(item, ZeroRun) else item.result()

"""Writing packs: objects are appended to an open pack, which is sealed at the target
size; its bytes go to the store on background threads while the next ones are made.

Contract: ``add`` returns the object's final location at once (pack ids are chosen when a
pack is opened). A location is only valid in the repository once ``Uploader.drain``
has returned without error; callers commit nothing that references a pack before that.

How the bytes travel: a pack is filled in segments of ``SEGMENT`` bytes, anonymous maps
taken from a pool and given back once written, so a pack of any size touches only a few
segments of memory. Fresh memory is the dear part on a virtual machine that hands freed
pages back to its host (benchmarks/README.md): buffers the size of whole packs cost an
import of a few packs a tenth of its time to touch and unmap. Each pack is a stream on
one of ``in_flight`` lanes (a thread each, running its packs' steps in order): the lane
hashes each segment into the trailer's body digest, writes it, and at the seal appends
the trailer and commits the object.

- A store that takes objects in pieces (``StreamingWrites``: a local disk) gets each
  segment as soon as it is full: a pack is on disk moments after it is sealed.
- Any other store (HTTP, S3) gets the pack whole from ``put``: the lane copies the
  segments into a contiguous buffer, recycled from pack to pack, and puts it at the seal.

Memory is bounded by the segment pool: when every segment waits on a lane, ``add``
waits for one. A failure on a lane is raised by the next ``add``, ``seal`` or ``drain``;
``close`` gives up the streams not yet committed (a local store deletes their temporary
files).
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from collections.abc import Callable, Iterable

from cafs.format.index import PackSummary
from cafs.format.location import Location
from cafs.format.pack import KIND_DATA, KIND_META, encode_trailer, pack_key
from cafs.ids import PackId, incremental_digest
from cafs.stores import ObjectWriter, Store, StreamingWrites

SEGMENT = 8 << 20  # a multiple of the O_DIRECT alignment: whole segments go around the page cache
FREE_BUFFERS = 2  # contiguous buffers kept for stores that take whole objects
META_PACK_MAX = 16 << 20  # a remote walk reads a metadata pack whole (cafs.metacache)


def target_size(kind: int, pack_size: int) -> int:
    """The size to fill a new pack of ``kind`` to, in a repository of ``pack_size``."""
    return min(pack_size, META_PACK_MAX) if kind == KIND_META else pack_size


class _SegmentPool:
    """At most ``limit`` segments, made when first needed and reused."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._made = 0
        self._free: list[mmap.mmap] = []
        self._cond = threading.Condition()

    def take(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self._made >= self._limit:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._made += 1
        return mmap.mmap(-1, SEGMENT)

    def give(self, seg: mmap.mmap) -> None:
        with self._cond:
            self._free.append(seg)
            self._cond.notify()


class _WholeObject:
    """An ``ObjectWriter`` for a store that only takes whole objects: the pieces are
    gathered in a contiguous buffer (recycled through ``buffers``) and put at commit."""

    def __init__(self, store: Store, key: str, buffers: _Buffers, size_hint: int) -> None:
        self._store = store
        self._key = key
        self._buffers = buffers
        self._size_hint = size_hint
        self._buf: mmap.mmap | None = None
        self._end = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        end = self._end + len(data)
        if self._buf is None or end > len(self._buf):
            bigger = self._buffers.take(max(end, 2 * self._end, self._size_hint))
            if self._buf is not None:
                bigger[:self._end] = self._buf[:self._end]
                self._buffers.give(self._buf)
            self._buf = bigger
        self._buf[self._end:end] = data
        self._end = end

    def commit(self) -> None:
        if self._buf is None:
            self._store.put(self._key, b"")
            return
        with memoryview(self._buf) as view, view[:self._end] as body:
            self._store.put(self._key, body)
        self.abort()

    def abort(self) -> None:
        buf, self._buf = self._buf, None
        if buf is not None:
            self._buffers.give(buf)


class _Buffers:
    """Contiguous buffers for ``_WholeObject``, the last few kept for reuse."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, max(size, SEGMENT))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < FREE_BUFFERS:
                self._free.append(buf)  # else unmapped when the last reference goes


class _PackStream:
    """One pack on its way to the store; its steps run in order on its lane."""

    def __init__(self, pack_id: PackId, kind: int, size_hint: int, lane: ThreadPoolExecutor) -> None:
        self.pack_id = pack_id
        self.kind = kind
        self.size_hint = size_hint
        self.lane = lane
        self.body = incremental_digest()
        self.writer: ObjectWriter | None = None
        self.failed = False
        self.done = False


class Uploader:
    """Puts packs into a store on lane threads; re-raises their errors."""

    def __init__(self, store: Store, in_flight: int = 2, segments: int = 12) -> None:
        self.store = store
        self._buffers = _Buffers()
        self._segments = _SegmentPool(max(segments, 2))
        self._lanes = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cafs-upload{i}")
                       for i in range(max(in_flight, 1))]
        self._next_lane = 0
        self._futures: list[Future[None]] = []
        self._streams: list[_PackStream] = []
        self._lock = threading.Lock()
        self.written: list[PackSummary] = []
        self.bytes_written = 0

    # -- called by PackWriter, on the importing thread ----------------------------

    def segment(self) -> mmap.mmap:
        """An empty segment to fill (waits while every segment is in use)."""
        self._raise_failures()
        return self._segments.take()

    def open(self, pack_id: PackId, kind: int, size_hint: int) -> _PackStream:
        """A stream for a new pack of about ``size_hint`` bytes."""
        lane = self._lanes[self._next_lane]
        self._next_lane = (self._next_lane + 1) % len(self._lanes)
        stream = _PackStream(pack_id, kind, size_hint, lane)
        self._streams.append(stream)
        return stream

    def ship(self, stream: _PackStream, seg: mmap.mmap, length: int) -> None:
        """Write ``seg[:length]`` as the next bytes of the pack; the segment comes back
        to the pool once written."""
        self._submit(stream, self._write, stream, seg, length)

    def finish(self, stream: _PackStream, entries: tuple[Location, ...], body_length: int) -> None:
        """Append the trailer of ``entries`` and commit the pack."""
        self._submit(stream, self._commit, stream, entries, body_length)

    def _submit(self, stream: _PackStream, fn: Callable[..., None], *args: Any) -> None:
        self._raise_failures()
        self._futures.append(stream.lane.submit(fn, *args))

    # -- on a lane ----------------------------------------------------------------

    def _write(self, stream: _PackStream, seg: mmap.mmap, length: int) -> None:
        try:
            if stream.failed:
                return
            with memoryview(seg) as view, view[:length] as piece:
                stream.body.update(piece)
                self._step(stream, lambda w: w.write(piece))
        finally:
            self._segments.give(seg)

    def _commit(self, stream: _PackStream, entries: tuple[Location, ...], body_length: int) -> None:
        if stream.failed:
            return
        trailer = encode_trailer(stream.kind, stream.body.digest(), list(entries))
        self._step(stream, lambda w: w.write(trailer))
        self._step(stream, lambda w: w.commit())
        stream.done = True
        length = body_length + len(trailer)
        with self._lock:
            self.written.append(PackSummary(stream.pack_id, length, stream.kind, entries))
            self.bytes_written += length

    def _step(self, stream: _PackStream, action: Callable[[ObjectWriter], None]) -> None:
        try:
            if stream.writer is None:
                stream.writer = self._writer(stream)
            action(stream.writer)
        except BaseException:
            stream.failed = True
            self._give_up(stream)
            raise

    def _writer(self, stream: _PackStream) -> ObjectWriter:
        key = pack_key(stream.pack_id)
        if isinstance(self.store, StreamingWrites):
            return self.store.open_writer(key)
        return _WholeObject(self.store, key, self._buffers, stream.size_hint + SEGMENT)

    @staticmethod
    def _give_up(stream: _PackStream) -> None:
        if stream.writer is not None and not stream.done:
            stream.writer.abort()
        stream.writer = None

    # -- the end ------------------------------------------------------------------

    def _raise_failures(self) -> None:
        pending = []
        for fut in self._futures:
            if fut.done():
                fut.result()  # raises the lane's exception, if any
            else:
                pending.append(fut)
        self._futures = pending

    def drain(self) -> None:
        """Wait for every step submitted; raise the first error."""
        futures, self._futures = self._futures, []
        for fut in futures:
            fut.result()
        self._streams = [s for s in self._streams if not s.done]

    def close(self) -> None:
        """Stop the lanes; streams not committed are given up."""
        for lane in self._lanes:
            lane.shutdown(wait=True, cancel_futures=True)
        for stream in self._streams:
            self._give_up(stream)
        self._streams = []


class PackWriter:
    """Fills packs of one kind (data or metadata) up to ``target`` bytes."""

    def __init__(self, uploader: Uploader, kind: int, target: int) -> None:
        self.uploader = uploader
        self.kind = kind
        self.target = target
        self._open()

    def _open(self) -> None:
        self._pack_id = PackId.random()
        self._stream: _PackStream | None = None
        self._seg: mmap.mmap | None = None
        self._used = 0  # bytes of the open segment filled
        self._end = 0  # bytes of the pack so far
        self._entries: list[Location] = []

    def _append(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        pos, n = 0, len(view)
        while pos < n:
            if self._seg is None:
                self._seg = self.uploader.segment()
            k = min(n - pos, SEGMENT - self._used)
            self._seg[self._used:self._used + k] = view[pos:pos + k]
            self._used += k
            pos += k
            if self._used == SEGMENT:
                self._ship()
        self._end += n

    def _ship(self) -> None:
        if self._stream is None:
            self._stream = self.uploader.open(self._pack_id, self.kind, self.target)
        assert self._seg is not None
        self.uploader.ship(self._stream, self._seg, self._used)
        self._seg, self._used = None, 0

    def add(self, oid: bytes, stored: bytes | memoryview, length: int, codec: int) -> Location:
        loc = Location(oid, self._pack_id, self._end, len(stored), length, codec)
        self._append(stored)
        self._entries.append(loc)
        if self._end >= self.target:
            self.seal()
        return loc

    def seal(self) -> None:
        """Finish the open pack (if it holds anything) and send it on its way."""
        if not self._entries:
            return
        if self._used:
            self._ship()
        stream = self._stream or self.uploader.open(self._pack_id, self.kind, self.target)
        self.uploader.finish(stream, tuple(self._entries), self._end)
        self._open()


def copy_into_new_packs(store: Store, pack_size: int,
                        objects: Iterable[tuple[int, Location, bytes | memoryview]]) -> list[PackSummary]:
    """Write each ``(pack kind, location, stored bytes)`` verbatim (same stored bytes,
    codec and lengths) into new packs of its kind in ``store``; returns them, written."""
    uploader = Uploader(store)
    try:
        writers = {kind: PackWriter(uploader, kind, target_size(kind, pack_size)) for kind in (KIND_DATA, KIND_META)}
        for kind, loc, stored in objects:
            writers[kind].add(loc.id, stored, loc.length, loc.codec)
        for writer in writers.values():
            writer.seal()
        uploader.drain()
        return list(uploader.written)
    finally:
        uploader.close()

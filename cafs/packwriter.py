"""Writing packs: objects are appended to an open pack, which is sealed at the target
size and uploaded on a background thread while the next one fills.

Contract: ``add`` returns the object's final location at once (pack ids are chosen when a
pack is opened). A location is only valid in the repository once ``Uploader.drain``
has returned without error; callers commit nothing that references a pack before that.
At most ``in_flight`` sealed packs wait in memory for upload, bounding memory to about
``(in_flight + 1) * pack_size`` per writer. Pack buffers are anonymous memory maps,
reused once uploaded: pages are only touched as bytes are written (a ``bytearray`` of
the target size would be zero-filled up front), a reused buffer costs no page faults, and
nothing is copied as a pack grows.
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cafs.format.index import PackSummary
from cafs.format.location import Location
from cafs.format.pack import encode_trailer, pack_key
from cafs.ids import PackId, digest
from cafs.stores import Store

FREE_BUFFERS = 2
SLACK = 16 << 20  # room past the target for the object that crosses it (address space only)


class Uploader:
    """Puts sealed packs into a store on worker threads; re-raises their errors."""

    def __init__(self, store: Store, in_flight: int = 2) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="cafs-upload")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []
        self.written: list[PackSummary] = []
        self.bytes_written = 0

    def buffer(self, size: int) -> mmap.mmap:
        """A buffer of at least ``size`` bytes, recycled from an uploaded pack if one is free."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, size)

    def submit(self, buf: mmap.mmap, length: int, summary: PackSummary) -> None:
        """Upload ``buf[:length]``; ``buf`` is recycled afterwards."""
        self._raise_failures()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._put, buf, length, summary))
        except BaseException:
            self._slots.release()
            raise

    def _put(self, buf: mmap.mmap, length: int, summary: PackSummary) -> None:
        try:
            with memoryview(buf) as view, view[:length] as body:
                self.store.put(pack_key(summary.pack_id), body)
            with self._lock:
                self.written.append(summary)
                self.bytes_written += length
                if len(self._free) < FREE_BUFFERS:
                    self._free.append(buf)  # else unmapped when the last reference goes
        finally:
            self._slots.release()

    def _raise_failures(self) -> None:
        pending = []
        for fut in self._futures:
            if fut.done():
                fut.result()  # raises the worker's exception, if any
            else:
                pending.append(fut)
        self._futures = pending

    def drain(self) -> None:
        """Wait for every submitted pack; raise the first upload error."""
        futures, self._futures = self._futures, []
        for fut in futures:
            fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class PackWriter:
    """Fills packs of one kind (data or metadata) up to ``target`` bytes."""

    def __init__(self, uploader: Uploader, kind: int, target: int) -> None:
        self.uploader = uploader
        self.kind = kind
        self.target = target
        self._open()

    def _open(self) -> None:
        self._pack_id = PackId.random()
        self._buf = self.uploader.buffer(self.target + SLACK)
        self._end = 0
        self._entries: list[Location] = []

    def _append(self, data: bytes | memoryview) -> None:
        end = self._end + len(data)
        if end > len(self._buf):  # an object larger than SLACK: move to a bigger buffer
            bigger = self.uploader.buffer(end + SLACK)
            bigger[:self._end] = self._buf[:self._end]
            self._buf = bigger
        self._buf[self._end:end] = data
        self._end = end

    def add(self, oid: bytes, stored: bytes | memoryview, length: int, codec: int) -> Location:
        loc = Location(oid, self._pack_id, self._end, len(stored), length, codec)
        self._append(stored)
        self._entries.append(loc)
        if self._end >= self.target:
            self.seal()
        return loc

    def seal(self) -> None:
        """Finish the open pack (if it holds anything) and hand it to the uploader."""
        if not self._entries:
            return
        with memoryview(self._buf) as view, view[:self._end] as body:
            checksum = digest(body)
        self._append(encode_trailer(self.kind, checksum, self._entries))
        summary = PackSummary(self._pack_id, self._end, self.kind, tuple(self._entries))
        buf, length = self._buf, self._end
        self._open()
        self.uploader.submit(buf, length, summary)

"""Writing packs: objects are appended to an open pack, which is sealed at the target
size and uploaded on a background thread while the next one fills.

Contract: ``add`` returns the object's final location at once (pack ids are chosen when a
pack is opened). A location is only valid in the repository once ``Uploader.drain``
has returned without error; callers commit nothing that references a pack before that.
At most ``in_flight`` sealed packs wait in memory for upload, bounding memory to about
``(in_flight + 1) * pack_size`` per writer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from cafs.format.index import PackSummary
from cafs.format.location import Location
from cafs.format.pack import encode_trailer, pack_key
from cafs.ids import PackId, digest
from cafs.stores import Store


class Uploader:
    """Puts sealed packs into a store on worker threads; re-raises their errors."""

    def __init__(self, store: Store, in_flight: int = 2) -> None:
        self.store = store
        self._pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="cafs-upload")
        self._slots = threading.BoundedSemaphore(in_flight)
        self._futures: list[Future[None]] = []
        self._lock = threading.Lock()
        self.written: list[PackSummary] = []
        self.bytes_written = 0

    def submit(self, data: bytearray, summary: PackSummary) -> None:
        self._raise_failures()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._put, data, summary))
        except BaseException:
            self._slots.release()
            raise

    def _put(self, data: bytearray, summary: PackSummary) -> None:
        try:
            self.store.put(pack_key(summary.pack_id), data)
            with self._lock:
                self.written.append(summary)
                self.bytes_written += len(data)
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
        self._body = bytearray()
        self._entries: list[Location] = []

    def add(self, oid: bytes, stored: bytes | memoryview, length: int, codec: int) -> Location:
        loc = Location(oid, self._pack_id, len(self._body), len(stored), length, codec)
        self._body += stored
        self._entries.append(loc)
        if len(self._body) >= self.target:
            self.seal()
        return loc

    def seal(self) -> None:
        """Finish the open pack (if it holds anything) and hand it to the uploader."""
        if not self._entries:
            return
        body = self._body
        body += encode_trailer(self.kind, digest(body), self._entries)
        summary = PackSummary(self._pack_id, len(body), self.kind, tuple(self._entries))
        self._open()
        self.uploader.submit(body, summary)

"""The fetch layer: plain, verified chunk bytes for a location, as fast as can be had.

``Fetcher.chunk(loc)`` looks in a small in-memory LRU of plain chunks, then in the
sparse ``ChunkCache``, then reads the stored bytes from the store, verifies them
against the chunk id and writes them through to the cache. Concurrent requests for
one chunk wait on a single load (single flight). Blocking work (preads, hashing,
decompression, LMDB writes) runs in worker threads under a ``trio.CapacityLimiter``,
so the trio loop keeps answering while a load is under way.

Raises ``IntegrityError`` when the store's bytes do not match their id (never returns
wrong bytes) and ``StoreError`` when the store fails. A damaged cache extent is dropped
and refetched. If the cache disk is full, chunks are served without caching and caching
is retried after ``CACHE_RETRY_SECONDS``.

``prefetch(locs)`` starts loads in the background (readahead) while ``running()`` is
active; the loads land in the in-memory LRU and the cache, and a reader asking for one of
them waits on that same load. At most ``MAX_PREFETCH`` background loads run at once;
beyond that, prefetch requests are dropped (they are hints).

Concurrency invariant: ``_inflight`` maps a chunk key to the event of the one load in
progress; it is only changed between awaits on the trio thread.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from collections.abc import AsyncIterator, Iterable

import lmdb
import trio

from cafs.chunkcache import ChunkCache
from cafs.errors import CafsError, IntegrityError, NoSpaceError
from cafs.format.location import Location, decode_stored
from cafs.repository import Repository

log = logging.getLogger("cafs.fetch")

CACHE_RETRY_SECONDS = 30.0
MAX_PREFETCH = 8
MEMORY_CHUNKS_BYTES = 64 << 20


@dataclass
class FetchCounters:
    hits: int = 0  # served from the sparse cache
    memory_hits: int = 0  # served from the in-memory LRU
    misses: int = 0  # fetched from the store
    bytes_fetched: int = 0  # stored bytes read from the store
    errors: int = 0
    in_flight: int = 0
    cache_full: int = 0  # inserts refused for lack of disk space
    damaged: int = 0  # cache extents that failed verification


class _Load:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class Fetcher:
    def __init__(self, repo: Repository, cache: ChunkCache | None, *, threads: int = 8,
                 memory_bytes: int = MEMORY_CHUNKS_BYTES) -> None:
        self.repo = repo
        self.cache = cache
        self.limiter = trio.CapacityLimiter(threads)
        self.counters = FetchCounters()
        self._inflight: dict[tuple[bytes, int], _Load] = {}
        self._memory: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._memory_bytes = 0
        self._memory_limit = memory_bytes
        self._cache_off_until = 0.0
        self._nursery: trio.Nursery | None = None
        self._prefetching = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Fetcher]:
        """Run background prefetching for the duration of the block."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()

    def prefetch(self, locs: Iterable[Location]) -> None:
        """Start loading ``locs`` in the background, if not loaded or loading already."""
        if self._nursery is None:
            return
        for loc in locs:
            if self._prefetching >= MAX_PREFETCH:
                return
            key = (loc.pack, loc.offset)
            if key in self._memory or key in self._inflight:
                continue
            self._prefetching += 1
            self._nursery.start_soon(self._prefetch_one, loc)

    async def _prefetch_one(self, loc: Location) -> None:
        try:
            await self.chunk(loc)
        except Exception as exc:  # a hint that failed; the reader will see the error itself
            log.debug("prefetch of %s failed: %s", loc.describe(), exc)
        finally:
            self._prefetching -= 1

    async def chunk(self, loc: Location) -> bytes:
        key = (loc.pack, loc.offset)
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.counters.memory_hits += 1
            return data
        load = self._inflight.get(key)
        if load is None:
            load = _Load()
            self._inflight[key] = load
            self.counters.in_flight += 1
            try:
                load.data = await trio.to_thread.run_sync(self._load, loc, limiter=self.limiter)
                self._remember(key, load.data)
            except BaseException as exc:
                load.error = exc
                self.counters.errors += 1
                raise
            finally:
                self.counters.in_flight -= 1
                del self._inflight[key]
                load.done.set()
            return load.data
        await load.done.wait()
        if load.error is not None:
            raise IntegrityError(f"chunk {loc.describe()}: {load.error}") if isinstance(load.error, IntegrityError) else load.error
        assert load.data is not None
        return load.data

    def _remember(self, key: tuple[bytes, int], data: bytes) -> None:
        if len(data) > self._memory_limit // 4:
            return
        self._memory[key] = data
        self._memory_bytes += len(data)
        while self._memory_bytes > self._memory_limit:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= len(old)

    def _load(self, loc: Location) -> bytes:
        """Runs in a worker thread."""
        cache = self.cache
        if cache is not None:
            try:
                stored = cache.read(loc.pack, loc.offset, loc.stored_length)
            except (CafsError, OSError, lmdb.Error) as exc:
                log.warning("cache read failed, going to the store: %s", exc)
                stored = None
            if stored is not None:
                try:
                    data = decode_stored(loc, stored)
                    self.counters.hits += 1
                    return data
                except IntegrityError as exc:
                    self.counters.damaged += 1
                    log.warning("cache extent damaged, refetching: %s", exc)
                    cache.drop(loc.pack, loc.offset)
        stored = self.repo.read_stored(loc)
        self.counters.misses += 1
        self.counters.bytes_fetched += len(stored)
        data = decode_stored(loc, stored)
        if cache is not None and time.monotonic() >= self._cache_off_until:
            try:
                cache.insert(loc.pack, loc.offset, stored, [(loc.offset, loc.stored_length)])
            except (CafsError, OSError) as exc:
                # a cache that cannot be written costs speed, never a read
                if isinstance(exc, NoSpaceError):
                    self.counters.cache_full += 1
                self._cache_off_until = time.monotonic() + CACHE_RETRY_SECONDS
                log.warning("%s; serving without caching for %.0f s", exc, CACHE_RETRY_SECONDS)
        return data

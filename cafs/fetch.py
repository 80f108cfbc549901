"""The fetch layer: plain, verified chunk bytes for a location, as fast as can be had.

``Fetcher.chunk(loc)`` looks in a small in-memory LRU of plain chunks, then among the
chunks fetched and not yet written to the cache (write-behind, below), then in the
sparse ``ChunkCache``, then reads the stored bytes from the store, verifies them
against the chunk id and writes them through to the cache. Concurrent requests for
one chunk wait on a single load (single flight). Blocking work (preads, hashing,
decompression, LMDB writes) runs in worker threads (``cafs.workers.WorkerPool``), so
the trio loop keeps answering while a load is under way.

The LRU's limit (``MEMORY_CHUNKS_BYTES``) counts what its chunks keep alive: a chunk
cut from a run's read is a view into it, so the whole read counts, once. It also holds
at most ``MEMORY_CHUNKS`` chunks: each costs some 300 bytes of its own (key, view, LRU
entry) that the bytes do not count, and chunks of a few bytes (a dataset of tiny files)
are thousands to a read.

Raises ``IntegrityError`` when the store's bytes do not match their id (never returns
wrong bytes) and ``StoreError`` when the store fails. A damaged cache extent is dropped
and refetched.

One deadline per load: a load from the store (its read on the trio loop, if any, then
its read in a worker thread with the retries and mirrors of ``cafs.sources``) ends with
``StoreUnavailable`` when the repository's deadline (the mount's ``timeout=``) has passed,
even while a request is still stalled in a socket: the thread is abandoned, finishes
on its own and its answer is dropped. A pack whose load failed that way is remembered
for ``FAILED_SECONDS``: meanwhile its chunks fail at once instead of waiting out another
deadline, since the kernel asks again, page by page, for what its readahead did not get,
and a reader whose chunk was in a failed background load asks again too. Any load that
succeeds from the store forgets every such failure (the store is back). ``close()``
(the mount going away) ends every wait on the store at once with ``FetcherClosed``, and
every later load that the cache cannot serve.

If the cache disk is full even after the cache made room (``ChunkCache.insert_batch``
evicts least-recently-used chunks first), chunks are served without caching and caching
is retried after ``CACHE_RETRY_SECONDS``.

``prefetch(locs)`` starts loads in the background (readahead) while ``running()`` is
active; the loads land in the in-memory LRU and the cache, and a reader asking for one of
them waits on that same load. Neighbouring chunks of one pack (gaps up to ``RUN_GAP``)
are loaded together, as runs of up to ``RUN_BYTES``: one ranged read from the store for
the chunks the cache lacks, since a remote store's first byte costs far more than the
next megabyte. At most ``MAX_PREFETCH`` background runs are under way at once, in
worker threads of their own (``prefetch_workers``), so that stalled background loads
never keep a reader's load from the store; beyond that, and for packs that failed
moments ago, prefetch requests are dropped (they are hints). A reader whose chunk was in
a background run that failed (a run fails as a whole, though only one of its chunks may
be bad) loads it once more itself before it gives up, unless the store failed.

Small runs (up to ``INLINE_BYTES``) are read on the trio thread when that cannot block
it: from the page cache (a cache extent, or a local repository's pack), or by a GET on
the loop from a plain-HTTP store (``cafs.stores.trio_gets``, bounded by its own timeout,
declining to the threaded path on any failure). A thread hand-off costs a small read
more than the read itself.

Cache reads, store reads and background store reads have separate pools of worker
threads, so a stalled store never keeps a cached read (or anything else) waiting for a
thread.

Write-through: while ``running()``, a run fetched from the store is handed to its
readers first and written to the cache behind them. Runs are gathered into batches of
``WRITE_BATCH_BYTES`` (or whatever ``WRITE_BATCH_SECONDS`` gathered), each written by the
``cache_writers`` pool (one thread) in one job and one LMDB transaction: a small file's
run alone cost more to hand over and record than to write. One writer, not two: each of
its syscalls gives up the GIL and takes it back from the trio thread, and a second
writer doubled those switches (5,000 shuffled small files over HTTP: 40,000 context switches and
10% more daemon CPU with two, 4 MiB batches 5% less than 1 MiB ones; large reads and
``cafs prefetch`` were as fast with one). While under ``WRITE_BEHIND_BYTES`` wait
to be written the readers go on; past that a load waits for its batch's write (a cache
disk slower than the store holds the readers back instead of memory growing). A chunk
waiting to be written is served from its stored bytes, verified again, if a reader asks
for it once the LRU has dropped it (random readers: 64 MiB of LRU go by in a few dozen
reads), rather than fetched a second time. Leaving
``running()`` writes the gathered batch and waits for every write handed over. Outside
``running()`` the thread that fetched a run writes it before its readers have it.

Concurrency invariant: ``_inflight`` maps a chunk key to the one load in progress; it,
``_failed``, ``_waits`` and ``_unwritten`` are only changed between awaits on the trio
thread.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import lmdb
import trio

from cafs.chunkcache import ChunkCache, Stored
from cafs.errors import CafsError, FetcherClosed, IntegrityError, NoSpaceError, ObjectNotFound, StoreUnavailable
from cafs.format.location import Location, decode_stored
from cafs.repository import Repository
from cafs.workers import WorkerPool

log = logging.getLogger("cafs.fetch")

T = TypeVar("T")

CACHE_RETRY_SECONDS = 30.0
FAILED_SECONDS = 2.0  # a pack whose load failed fails at once for this long (or until a load succeeds)
CLOSED = "store reads stopped: the mount is being unmounted"
MAX_PREFETCH = 8
RUN_BYTES = 8 << 20
RUN_GAP = 128 << 10
MEMORY_CHUNKS_BYTES = 64 << 20
MEMORY_CHUNKS = 1 << 16  # chunks in the in-memory LRU, whatever their bytes: some 20 MB of their own
INLINE_BYTES = 256 << 10
Plain = bytes | memoryview  # a chunk's verified plain bytes: a view into its run's read, or its own
CacheWrites = list[tuple[bytes, list[tuple[int, Stored]]]]  # (pack, [(offset, stored bytes)])
StoreRun = list[tuple[bytes | memoryview, Plain]]  # a run's stored and verified plain bytes, chunk by chunk
WRITE_BATCH_BYTES = 4 << 20
WRITE_BATCH_SECONDS = 0.05
WRITE_BEHIND_BYTES = 64 << 20
WRITER_THREADS = 1
ADVISE_BYTES = 1 << 20


@dataclass
class FetchCounters:
    hits: int = 0  # served from the sparse cache
    memory_hits: int = 0  # served from memory: the LRU, or a chunk waiting to be written to the cache
    misses: int = 0  # fetched from the store
    bytes_fetched: int = 0  # stored bytes read from the store
    errors: int = 0
    in_flight: int = 0
    cache_full: int = 0  # inserts refused for lack of disk space
    damaged: int = 0  # cache extents that failed verification
    inline: int = 0  # chunks loaded on the trio thread: from the page cache, or by a GET on the loop


class _Load:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Plain | None = None
        self.error: BaseException | None = None


def runs(locs: Iterable[Location]) -> list[list[Location]]:
    """``locs`` grouped into runs: same pack, ascending offsets, gaps up to ``RUN_GAP``,
    at most ``RUN_BYTES`` from the first byte to the last."""
    out: list[list[Location]] = []
    for loc in sorted(locs, key=lambda l: (l.pack, l.offset)):
        if out:
            run = out[-1]
            prev = run[-1]
            end = prev.offset + prev.stored_length
            if (loc.pack == prev.pack and end <= loc.offset <= end + RUN_GAP
                    and loc.offset + loc.stored_length - run[0].offset <= RUN_BYTES):
                run.append(loc)
                continue
            if loc.pack == prev.pack and loc.offset == prev.offset:
                continue  # the same chunk twice
        out.append([loc])
    return out


def _inline(run: list[Location]) -> bool:
    """Whether ``run`` is small enough to read on the trio thread."""
    return run[-1].offset + run[-1].stored_length - run[0].offset <= INLINE_BYTES


def _cache_write(run: list[Location], stored: Sequence[bytes | memoryview]) -> tuple[bytes, list[tuple[int, Stored]]]:
    """``run``'s entry in ``CacheWrites``: its pack and each chunk's offset and stored bytes.
    The cache holds stored bytes as a location names them; an object gc moved may be
    stored in another form where it was read (``Repository.relocated``): it is left out."""
    return run[0].pack, [(loc.offset, b) for loc, b in zip(run, stored) if len(b) == loc.stored_length]


def _held(data: Plain) -> tuple[int, int]:
    """(identity, size) of the buffer that ``data`` keeps alive: a chunk that is a view
    into its run's read keeps the whole read (up to ``RUN_BYTES``), so the LRU counts
    that, once for all the chunks in it; a random reader keeping one chunk of each run
    would otherwise hold several times the LRU's limit. The identity is stable while
    the LRU holds a chunk of the buffer, since the chunk keeps it alive."""
    base = data.obj if isinstance(data, memoryview) else data
    return id(base), memoryview(base).nbytes


def _settle(run: list[Location], got: Sequence[Plain | None], waiting: dict[tuple[bytes, int], _Load]) -> None:
    """Give each chunk of ``run`` that ``got`` holds to its load, which stops waiting."""
    for loc, data in zip(run, got):
        if data is not None:
            waiting.pop((loc.pack, loc.offset)).data = data


class Fetcher:
    def __init__(self, repo: Repository, cache: ChunkCache | None, *, threads: int = 8,
                 memory_bytes: int = MEMORY_CHUNKS_BYTES, memory_chunks: int = MEMORY_CHUNKS) -> None:
        self.repo = repo
        self.cache = cache
        self.cache_workers = WorkerPool(threads, "cache")
        self.store_workers = WorkerPool(threads, "store")
        self.prefetch_workers = WorkerPool(MAX_PREFETCH, "prefetch")
        self.deadline = repo.sources.deadline
        self.cache_writers = WorkerPool(WRITER_THREADS, "cache-write")
        self._writing = 0  # stored bytes handed to write-behind, not yet written
        self._batch: CacheWrites = []  # gathered for the next write-behind
        self._batch_bytes = 0
        # the stored bytes of each chunk handed to write-behind and not written yet, by key:
        # a chunk the LRU dropped meanwhile is served from here, not fetched again
        self._unwritten: dict[tuple[bytes, int], Stored] = {}
        self.counters = FetchCounters()
        self._inflight: dict[tuple[bytes, int], _Load] = {}
        self._memory: OrderedDict[tuple[bytes, int], Plain] = OrderedDict()
        self._memory_bytes = 0  # of the buffers its chunks keep alive (see _held)
        self._buffers: dict[int, list[int]] = {}  # id of a buffer held -> [its size, chunks in it]
        self._memory_limit = memory_bytes
        self._memory_chunks = memory_chunks
        self._cache_off_until = 0.0
        self._nursery: trio.Nursery | None = None
        self._prefetching = 0
        self._failed: dict[bytes, tuple[float, str]] = {}  # pack -> (until when, why): fail at once
        self._waits: set[trio.CancelScope] = set()  # one per wait on the store, for close()
        self._closed = False

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Fetcher]:
        """Run background prefetching for the duration of the block."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                if self._batch:
                    self._write_behind(*self._take_batch())
                self._nursery = None
                nursery.cancel_scope.cancel()

    @property
    def pending_writes(self) -> int:
        """Stored bytes fetched and handed to their readers, not yet written to the cache."""
        return self._writing + self._batch_bytes

    def close(self) -> None:
        """Stop reading from the store: every wait on it ends now with ``FetcherClosed``
        (its readers get the error), and so does every later load that the cache cannot
        serve. Chunks in memory or in the cache are still served."""
        self._closed = True
        for scope in self._waits:
            scope.cancel()

    def prefetch(self, locs: Iterable[Location]) -> None:
        """Start loading ``locs`` in the background, if not loaded or loading already."""
        if self._nursery is None or self._closed:
            return
        todo = [loc for loc in locs if (loc.pack, loc.offset) not in self._memory
                and (loc.pack, loc.offset) not in self._inflight and not self._recently_failed(loc.pack)]
        for run in runs(todo):
            # each run holds a thread at most, and so does each abandoned one until its
            # stalled request ends: a run is started only if a thread waits for it, so a
            # reader waiting on a background load never waits for a thread as well
            if self._prefetching + self.prefetch_workers.abandoned >= MAX_PREFETCH:
                return
            self._prefetching += 1
            self._nursery.start_soon(self._prefetch_run, run, self._register(run))

    async def _prefetch_run(self, run: list[Location], loads: list[_Load]) -> None:
        try:
            await self._load_run(run, loads, self.prefetch_workers)
        except Exception as exc:  # a hint that failed; a reader will try again itself
            log.debug("prefetch of %s failed: %s", run[0].describe(), exc)
        finally:
            self._prefetching -= 1

    async def load(self, run: Iterable[Location]) -> None:
        """Have every chunk of ``run`` loaded (into the cache and memory): missing ones as
        coalesced runs, in this task; ones another task is loading, waited for. Raises
        the first error met."""
        todo, waits = [], []
        for loc in run:
            key = (loc.pack, loc.offset)
            if key in self._inflight:
                waits.append(self._inflight[key])
            elif key not in self._memory:
                todo.append(loc)
        for part in runs(todo):
            await self._load_run(part, self._register(part))
        for load in waits:
            await load.done.wait()
            if load.error is not None:
                raise load.error

    async def chunk(self, loc: Location) -> Plain:
        """The verified plain bytes of ``loc``: from memory, the cache, a load under way
        or the store, in that order."""
        key = (loc.pack, loc.offset)
        for attempt in range(2):
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
                self.counters.memory_hits += 1
                return data
            load = self._inflight.get(key)
            if load is None:
                load = self._register([loc])[0]
                await self._load_run([loc], [load])
            else:
                await load.done.wait()
                if load.error is not None and attempt == 0:
                    continue  # someone else's load failed: try once ourselves (refused if the store failed)
            if load.error is not None:
                raise load.error
            assert load.data is not None
            return load.data
        raise AssertionError("unreachable")

    def _register(self, run: list[Location]) -> list[_Load]:
        loads = []
        for loc in run:
            load = _Load()
            self._inflight[(loc.pack, loc.offset)] = load
            loads.append(load)
        self.counters.in_flight += len(run)
        return loads

    async def _load_run(self, run: list[Location], loads: list[_Load], workers: WorkerPool | None = None) -> None:
        """Resolve ``loads`` (one per chunk of ``run``); raises the first error met.
        ``workers``: the pool for its store reads (default: ``store_workers``)."""
        try:
            waiting = {(loc.pack, loc.offset): load for loc, load in zip(run, loads)}
            todo = run
            unwritten = [(loc, self._unwritten[(loc.pack, loc.offset)]) for loc in run
                         if (loc.pack, loc.offset) in self._unwritten]
            if unwritten:
                _settle([loc for loc, _ in unwritten], await self.cache_workers.run(self._from_unwritten, unwritten),
                        waiting)
                todo = [loc for loc in run if (loc.pack, loc.offset) in waiting]
            maybe_cached = bool(todo) and self._maybe_cached(todo)
            if maybe_cached and _inline(todo):
                _settle(todo, self._from_cache(todo, resident=True), waiting)
            rest = [loc for loc in todo if (loc.pack, loc.offset) in waiting]
            if rest and maybe_cached and (len(rest) == len(todo) or self._maybe_cached(rest)):
                _settle(rest, await self.cache_workers.run(self._from_cache, rest), waiting)
            behind = self.cache is not None and self._nursery is not None
            for part in runs(loc for loc in todo if (loc.pack, loc.offset) in waiting):
                got = await self._load_from_store(part, workers or self.store_workers,
                                                  self.cache is not None and not behind)
                part_loads = [waiting[(loc.pack, loc.offset)] for loc in part]
                _settle(part, [data for _, data in got], waiting)
                self._finish(part, part_loads)  # the readers go on while the cache is written
                if behind:
                    await self._write_through(part, [stored for stored, _ in got])
        except BaseException as exc:
            self.counters.errors += 1
            for load in loads:
                if load.data is None:
                    load.error = exc
            raise
        finally:
            self._finish(run, loads)

    async def _load_from_store(self, run: list[Location], workers: WorkerPool, write: bool) -> StoreRun:
        """``run`` from the store within one deadline: on the trio thread if it can be
        had there, else by ``_from_store`` on one of ``workers``. Refused at once while
        its pack is remembered as failing; remembered when it fails for want of a store."""
        pack = run[0].pack
        self._refuse(pack)
        inline = self._store_reads_inline() and _inline(run)
        if inline:  # from the page cache, which never waits: no deadline to keep
            got = self._store_resident(run)
            if got is not None:
                return got

        async def read(give_up: float) -> StoreRun:
            got = await self._store_async(run) if inline else None
            if got is None:  # one that writes the cache is never left to write after the cache closed
                got = await workers.run(self._from_store, run, write, give_up, abandon_on_cancel=not write)
            return got
        try:
            return await self._within_deadline(run[0].describe(), read)
        except StoreUnavailable as exc:
            now = time.monotonic()
            self._failed = {p: f for p, f in self._failed.items() if f[0] > now}
            self._failed[pack] = (now + FAILED_SECONDS, f"{exc} (failed moments ago; not asked again yet)")
            raise

    async def store_call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a read from the store (of ``what``, for messages), on a store
        worker thread, as a load of this fetcher's: ``StoreUnavailable`` once the deadline
        has passed, ``FetcherClosed`` once the fetcher is closed."""
        if self._closed:
            raise FetcherClosed(CLOSED)
        return await self._within_deadline(what, lambda _give_up: self.store_workers.run(fn, *args,
                                                                                       abandon_on_cancel=True))

    async def _within_deadline(self, what: str, wait: Callable[[float], Awaitable[T]]) -> T:
        """``await wait(give_up)``, a read from the store, ended early by the deadline
        (``give_up`` is that instant on ``time.monotonic()``, for retries in threads) or by
        ``close()``. Once one succeeds, no pack is remembered as failing: the store answers
        again."""
        with trio.CancelScope(deadline=trio.current_time() + self.deadline) as scope:
            self._waits.add(scope)
            try:
                got = await wait(time.monotonic() + self.deadline)
            finally:
                self._waits.discard(scope)
            self._failed.clear()
            return got
        if self._closed:
            raise FetcherClosed(f"{what}: {CLOSED}")
        raise StoreUnavailable(f"{what}: not read from the store within {self.deadline:g} s")

    def _recently_failed(self, pack: bytes) -> bool:
        failed = self._failed.get(pack)
        return failed is not None and time.monotonic() < failed[0]

    def _refuse(self, pack: bytes) -> None:
        """Raise instead of asking the store: the fetcher is closed, or ``pack`` failed
        moments ago."""
        if self._closed:
            raise FetcherClosed(CLOSED)
        if self._recently_failed(pack):
            raise StoreUnavailable(self._failed[pack][1])

    def _finish(self, run: list[Location], loads: list[_Load]) -> None:
        """End the loads of ``run`` (one each) not ended yet: their readers wake, and the
        data joins the in-memory LRU."""
        for loc, load in zip(run, loads):
            key = (loc.pack, loc.offset)
            if self._inflight.get(key) is load:
                del self._inflight[key]
                self.counters.in_flight -= 1
                if load.data is not None:
                    self._remember(key, load.data)
                load.done.set()

    async def _write_through(self, run: list[Location], stored: list[bytes | memoryview]) -> None:
        """Add a run fetched from the store to the batch for the cache, and hand the batch
        to a writer once it is large enough (a timer hands over a smaller one). Past
        ``WRITE_BEHIND_BYTES`` waiting to be written, wait for the batch's write here."""
        assert self._nursery is not None
        if not self._batch:
            self._nursery.start_soon(self._write_soon)
        entry = _cache_write(run, stored)
        self._unwritten.update(((entry[0], offset), b) for offset, b in entry[1])
        self._batch.append(entry)
        self._batch_bytes += sum(len(b) for _, b in entry[1])
        if self._writing + self._batch_bytes > WRITE_BEHIND_BYTES:
            writes = self._take_batch()[0]
            try:
                await self.cache_writers.run(self._insert, writes)
            finally:
                self._written(writes)
        elif self._batch_bytes >= WRITE_BATCH_BYTES:
            self._write_behind(*self._take_batch())

    async def _write_soon(self) -> None:
        await trio.sleep(WRITE_BATCH_SECONDS)
        if self._batch:
            self._write_behind(*self._take_batch())

    def _take_batch(self) -> tuple[CacheWrites, int]:
        batch = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        return batch

    def _write_behind(self, writes: CacheWrites, size: int) -> None:
        assert self._nursery is not None
        self._writing += size
        self._nursery.start_soon(self._write_batch, writes, size)

    async def _write_batch(self, writes: CacheWrites, size: int) -> None:
        # no checkpoint before the pool takes the job: a nursery cancelled meanwhile
        # (the mount or prefetch ending) still has it written, not dropped
        try:
            await self.cache_writers.run(self._insert, writes)
        finally:
            self._writing -= size
            self._written(writes)

    def _written(self, writes: CacheWrites) -> None:
        """Forget ``writes`` as unwritten: the cache has them now (or refused them)."""
        for pack, extents in writes:
            for offset, b in extents:
                if self._unwritten.get((pack, offset)) is b:
                    del self._unwritten[(pack, offset)]

    @property
    def memory_held(self) -> int:
        """Bytes the in-memory LRU keeps alive (never above its limit)."""
        return self._memory_bytes

    def _remember(self, key: tuple[bytes, int], data: Plain) -> None:
        buffer, size = _held(data)
        if size > self._memory_limit // 4:
            return
        if key in self._memory:
            self._forget(self._memory.pop(key))
        self._memory[key] = data
        held = self._buffers.setdefault(buffer, [size, 0])
        if held[1] == 0:
            self._memory_bytes += size
        held[1] += 1
        while self._memory_bytes > self._memory_limit or len(self._memory) > self._memory_chunks:
            self._forget(self._memory.popitem(last=False)[1])

    def _forget(self, data: Plain) -> None:
        """Account for ``data`` leaving the LRU: its buffer is no longer held once the
        last chunk in it is gone."""
        buffer, size = _held(data)
        held = self._buffers[buffer]
        held[1] -= 1
        if held[1] == 0:
            del self._buffers[buffer]
            self._memory_bytes -= size

    def _maybe_cached(self, run: list[Location]) -> bool:
        """Whether the cache records any chunk of ``run``: an LMDB lookup on this thread
        spares a cold load its trip to a worker thread before the one to the store."""
        if self.cache is None:
            return False
        try:
            return any(self.cache.cached((loc.pack, loc.offset, loc.stored_length) for loc in run))
        except lmdb.Error:
            return True  # let the worker thread meet the error and go to the store

    def _store_reads_inline(self) -> bool:
        """Whether a small run may be read from the store on the trio thread (a local
        repository's page cache, a GET on the loop): not if the cache must have it first
        (outside ``running()``, no write-behind)."""
        return self.cache is None or self._nursery is not None

    def _store_resident(self, run: list[Location]) -> StoreRun | None:
        """On the trio thread: ``_from_store`` of a run of at most ``INLINE_BYTES`` that a
        store on a local disk has in the page cache (``Repository.read_run_resident``),
        without writing the cache; None for any other. A small read spares two thread
        hand-offs, which cost more than its pread and hash."""
        return self._counted_inline(run, self.repo.read_run_resident(run))

    async def _store_async(self, run: list[Location]) -> StoreRun | None:
        """On the trio thread: ``_from_store`` of a small run through a store that answers
        on the loop itself (``Repository.read_run_async``: plain HTTP), without writing the
        cache; None if it cannot or declines. A GET on a worker thread costs the daemon
        more in hand-offs than the GET itself."""
        return self._counted_inline(run, await self.repo.read_run_async(run))

    def _counted_inline(self, run: list[Location], got: StoreRun | None) -> StoreRun | None:
        if got is not None:
            self.counters.inline += len(run)
            self.counters.misses += len(run)
            self.counters.bytes_fetched += sum(loc.stored_length for loc in run)
        return got

    def advise(self, locs: Iterable[Location]) -> None:
        """Hint that ``locs`` (a file just opened: its first chunks) are about to be read:
        those of its first ``ADVISE_BYTES`` that are on a local disk (in the chunk cache,
        or else in a local repository) start coming into the page cache now, for a read
        on the trio thread to find when it arrives."""
        todo, total = [], 0
        for loc in locs:
            if total >= ADVISE_BYTES:
                break
            total += loc.stored_length
            if (loc.pack, loc.offset) not in self._memory and (loc.pack, loc.offset) not in self._inflight:
                todo.append(loc)
        if not todo:
            return
        hits = [False] * len(todo)
        if self.cache is not None:
            try:
                hits = self.cache.cached((loc.pack, loc.offset, loc.stored_length) for loc in todo)
            except lmdb.Error:
                return
            for loc, hit in zip(todo, hits):
                if hit:
                    self.cache.advise(loc.pack, loc.offset, loc.stored_length)
        if self._store_reads_inline():
            for run in runs(loc for loc, hit in zip(todo, hits) if not hit):
                self.repo.advise_run(run)

    def _from_unwritten(self, held: list[tuple[Location, Stored]]) -> list[Plain | None]:
        """Runs in a worker thread: the plain bytes of chunks fetched moments ago and not
        yet written to the cache, from their stored bytes, verified again."""
        out: list[Plain | None] = []
        for loc, stored in held:
            try:
                out.append(decode_stored(loc, stored))
                self.counters.memory_hits += 1
            except IntegrityError:  # never expected of bytes verified once: the store decides
                out.append(None)
        return out

    def _from_cache(self, run: list[Location], resident: bool = False) -> list[Plain | None]:
        """Runs in a worker thread: the plain bytes of each chunk the cache holds intact.
        With ``resident`` (on the trio thread), only those the page cache holds; a
        damaged extent is then left for a worker thread to meet and drop."""
        cache = self.cache
        if cache is None:
            return [None] * len(run)
        out: list[Plain | None] = []
        for loc in run:
            try:
                stored = cache.read(loc.pack, loc.offset, loc.stored_length, resident=resident)
            except (CafsError, OSError, lmdb.Error) as exc:
                if not resident:
                    log.warning("cache read failed, going to the store: %s", exc)
                stored = None
            data = None
            if stored is not None:
                try:
                    data = decode_stored(loc, stored)
                    self.counters.hits += 1
                    self.counters.inline += resident
                except IntegrityError as exc:
                    if not resident:
                        self.counters.damaged += 1
                        log.warning("cache extent damaged, refetching: %s", exc)
                        try:
                            cache.drop(loc.pack, loc.offset)
                        except CafsError as why:  # met and dropped again by a later read
                            log.warning("%s", why)
            out.append(data)
        return out

    def _from_store(self, run: list[Location], write: bool, give_up: float) -> StoreRun:
        """Runs in a worker thread: the stored and the verified plain bytes of ``run``
        from the store, written through to the cache first if ``write``; retried until
        ``give_up`` (``time.monotonic()``)."""
        if time.monotonic() >= give_up:
            raise StoreUnavailable(f"{run[0].describe()}: abandoned before it started")  # nobody waits
        try:
            got = self.repo.read_run(run, give_up=give_up, missing_ends=True)
        except ObjectNotFound:
            got = [self.repo.read_verified(loc, give_up=give_up) for loc in run]  # moved by gc: one by one
        self.counters.misses += len(run)
        self.counters.bytes_fetched += sum(len(stored) for stored, _ in got)
        if write:
            self._insert([_cache_write(run, [stored for stored, _ in got])])
        return got

    def _insert(self, writes: CacheWrites) -> None:
        """Runs in a worker thread: write verified stored bytes to the cache."""
        cache = self.cache
        if cache is None or time.monotonic() < self._cache_off_until:
            return
        try:
            cache.insert_batch(writes)
        except (CafsError, OSError, lmdb.Error) as exc:
            # a cache that cannot be written costs speed, never a read
            if isinstance(exc, NoSpaceError):
                self.counters.cache_full += 1
            self._cache_off_until = time.monotonic() + CACHE_RETRY_SECONDS
            log.warning("%s; serving without caching for %.0f s", exc, CACHE_RETRY_SECONDS)

"""Warming this host's chunk cache for a snapshot, or paths inside one (``cafs prefetch``).

``plan`` walks the tree below the given paths and collects the distinct chunk locations
of its files: a chunk shared by several files (or reached by two overlapping paths) is
counted and fetched once. ``cache_share`` says how much of a plan the cache holds: one
LMDB lookup per chunk, in one read transaction, no bytes read. ``prefetch`` loads what
the cache lacks through a ``Fetcher``, so every chunk is verified against its id before
it is written through to the cache, as coalesced runs (``cafs.fetch.runs``: neighbouring
chunks of one pack, up to ``RUN_BYTES``, one ranged read each), ``jobs`` runs at a time.

Deliberately not done here: reading through a FUSE mount (the cache is shared between
processes through LMDB, so warming a mounted snapshot means writing into the mount's
cache directly, which is faster than the FUSE path); making room (the cache's own limit
evicts least-recently-used extents, so a tree larger than the limit ends up only partly
cached; the command warns before it starts); formatting.

Errors: ``plan`` raises what reading nodes raises (``PathNotFound`` for a path not in the
snapshot, ``FormatError``, ``IntegrityError``, ``StoreError``). ``prefetch`` records a
chunk that cannot be had (``IntegrityError``/``FormatError``: damaged everywhere it was
looked for; ``ObjectNotFound``: its pack is missing) in the result and goes on with the
others; any other error (a store still unavailable at its deadline, refused credentials)
stops it and is raised. Wrong bytes are never cached: the fetcher verifies first.
A cache that cannot be written for a reason other than space (a read-only or failing
disk, a directory this user may not write: EROFS, EACCES, EIO) stops it too, with
``CacheError`` naming the cache and the reason: a mount's fetcher serves on without
caching, but a prefetch would fetch the whole tree for nothing. What was cached before
is kept. A full disk does not stop it: the cache makes room, and what does not fit is
counted (``PrefetchResult.cache_full``), as a tree larger than the limit ends up partly
cached.

Each run is loaded with ``Fetcher.load`` (one coalesced ranged read), ``jobs`` runs at
once; a run that fails as a whole is retried one chunk at a time, so its good chunks
are still cached and the bad ones are named.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import lmdb
import trio

from cafs.chunkcache import CacheError, ChunkCache, Stored
from cafs.errors import CafsError, FormatError, IntegrityError, NoSpaceError, ObjectNotFound
from cafs.fetch import Fetcher, runs
from cafs.format.location import Location
from cafs.format.nodes import Entry
from cafs.metacache import NodeReader
from cafs.repository import Repository
from cafs.tree import file_spans, resolve, walk

MAX_JOBS = 64
DEFAULT_JOBS = 8
MAX_REPORTED_ERRORS = 20  # distinct messages kept; the count of failed chunks is exact

# chunk problems that do not stop a prefetch: the chunk is reported, the rest goes on
DATA_ERRORS = (IntegrityError, FormatError, ObjectNotFound)


@dataclass
class Plan:
    """The distinct chunk locations below some paths of a snapshot."""

    paths: list[bytes]
    locations: list[Location]  # distinct (pack, offset), in pack and offset order
    files: int = 0
    logical_bytes: int = 0  # sum of file sizes, each name counted

    @property
    def stored_bytes(self) -> int:
        return sum(loc.stored_length for loc in self.locations)


@dataclass
class PlanProgress:
    """Read by a progress display while ``plan`` walks."""

    files: int = 0
    chunks: int = 0


def plan(reader: NodeReader, root: Entry, paths: Sequence[bytes],
         progress: PlanProgress | None = None) -> Plan:
    """The chunks of every file at or below ``paths`` (inside the tree at ``root``;
    ``b""`` is ``root`` itself)."""
    progress = progress or PlanProgress()
    found: dict[tuple[bytes, int], Location] = {}
    seen_files: set[bytes] = set()
    out = Plan(list(paths), [])
    for path in paths:
        top = resolve(reader, root, path)
        for sub, e in walk(reader, top, path):
            if not e.is_file or sub in seen_files:
                continue
            seen_files.add(sub)
            out.files += 1
            out.logical_bytes += e.size
            for span in file_spans(reader, e):
                found.setdefault((span.pack, span.offset), span)
            progress.files = out.files
            progress.chunks = len(found)
    out.locations = [found[k] for k in sorted(found)]
    return out


@dataclass(frozen=True)
class CacheShare:
    chunks: int
    cached_chunks: int
    stored_bytes: int
    cached_bytes: int

    @property
    def fraction(self) -> float:
        """Share of the stored bytes cached (1.0 for nothing to cache)."""
        return self.cached_bytes / self.stored_bytes if self.stored_bytes else 1.0


def cached_flags(cache: ChunkCache, locs: Sequence[Location]) -> list[bool]:
    return cache.cached((loc.pack, loc.offset, loc.stored_length) for loc in locs)


def cache_share(cache: ChunkCache, locs: Sequence[Location]) -> CacheShare:
    flags = cached_flags(cache, locs)
    return CacheShare(len(locs), sum(flags), sum(loc.stored_length for loc in locs),
                      sum(loc.stored_length for loc, hit in zip(locs, flags) if hit))


@dataclass
class PrefetchState:
    """Progress of a prefetch, read by a progress display from another thread."""

    total_bytes: int = 0  # stored bytes of the chunks to load
    total_chunks: int = 0
    done_bytes: int = 0  # loaded (or failed) so far
    done_chunks: int = 0
    runs: int = 0


@dataclass
class PrefetchResult:
    chunks: int  # distinct chunks of the plan
    stored_bytes: int
    skipped_chunks: int  # cached already: not loaded at all
    skipped_bytes: int
    fetched_chunks: int = 0  # read from the store, verified, written to the cache
    fetched_bytes: int = 0
    found_chunks: int = 0  # cached by someone else (a mount) while this ran
    failed_chunks: int = 0
    runs: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # distinct messages, at most MAX_REPORTED_ERRORS
    cache_full: int = 0  # inserts the cache refused for lack of disk space


def prefetch(repo: Repository, cache: ChunkCache, locs: Sequence[Location], *, jobs: int = DEFAULT_JOBS,
             state: PrefetchState | None = None) -> PrefetchResult:
    """Load every chunk of ``locs`` that ``cache`` lacks into it (blocks; runs trio)."""
    if not 1 <= jobs <= MAX_JOBS:
        raise ValueError(f"jobs must be 1 to {MAX_JOBS}")
    state = state or PrefetchState()
    flags = cached_flags(cache, locs)
    todo = [loc for loc, hit in zip(locs, flags) if not hit]
    result = PrefetchResult(len(locs), sum(loc.stored_length for loc in locs), len(locs) - len(todo),
                            sum(loc.stored_length for loc, hit in zip(locs, flags) if hit))
    work = runs(todo)
    state.total_bytes = sum(loc.stored_length for loc in todo)
    state.total_chunks = len(todo)
    started = time.monotonic()
    writes = _WritesChecked(cache)
    fetcher = Fetcher(repo, cast(ChunkCache, writes), threads=jobs)
    try:
        trio.run(_load_all, fetcher, writes, iter(work), jobs, state, result)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    writes.check()  # the last batch is written as the fetcher stops
    c = fetcher.counters
    result.fetched_chunks, result.fetched_bytes, result.found_chunks = c.misses, c.bytes_fetched, c.hits
    result.cache_full = c.cache_full
    result.runs = len(work)
    result.seconds = time.monotonic() - started
    return result


class _WritesChecked:
    """``cache`` as the fetcher of a prefetch sees it: an insert that fails for a reason
    other than space is kept in ``failed`` (the first) rather than raised, so that the
    fetcher does not log it as a mount's fetcher would (serving on without caching), and
    ``check`` raises it once the run is loaded. A full disk is raised as before: the
    fetcher counts it (``cache_full``)."""

    def __init__(self, cache: ChunkCache) -> None:
        self._cache = cache
        self.failed: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def insert_batch(self, batch: Sequence[tuple[bytes, Sequence[tuple[int, Stored]]]]) -> None:
        if self.failed is not None:
            return  # the prefetch is stopping
        try:
            self._cache.insert_batch(batch)
        except NoSpaceError:
            raise
        except (CafsError, OSError, lmdb.Error) as exc:
            self.failed = exc

    def check(self) -> None:
        """Raise ``CacheError`` naming the cache and why, if an insert failed."""
        exc = self.failed
        if exc is None:
            return
        if isinstance(exc, OSError):
            why = exc.strerror or str(exc)
            if exc.filename is not None:
                why += f" ({os.fsdecode(exc.filename)})"
        else:
            why = str(exc)
        raise CacheError(f"cache {self._cache.root} cannot be written: {why}; what it held before is kept")


async def _load_all(fetcher: Fetcher, writes: _WritesChecked, work: Iterator[list[Location]], jobs: int,
                    state: PrefetchState, result: PrefetchResult) -> None:
    # ``work`` is shared by the workers: next() runs on the trio thread between awaits,
    # so each run is taken by exactly one worker
    async def worker() -> None:
        for run in work:
            await _load_run(fetcher, run, state, result)
            writes.check()  # a cache that cannot be written: fetch no more for it

    async with fetcher.running(), trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(worker)


async def _load_run(fetcher: Fetcher, run: list[Location], state: PrefetchState,
                    result: PrefetchResult) -> None:
    """Load ``run`` as one coalesced read; if that fails, chunk by chunk."""
    try:
        await fetcher.load(run)
        good = True
    except DATA_ERRORS:
        good = False
    for loc in run:
        if not good:
            try:
                await fetcher.chunk(loc)
            except DATA_ERRORS as exc:
                result.failed_chunks += 1
                message = str(exc)
                if message not in result.errors and len(result.errors) < MAX_REPORTED_ERRORS:
                    result.errors.append(message)
        state.done_bytes += loc.stored_length
        state.done_chunks += 1
    state.runs += 1


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that stopped the nurseries (trio wraps it in a group per nursery)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group

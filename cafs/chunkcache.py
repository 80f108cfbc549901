"""The per-host sparse chunk cache: stored chunk bytes in sparse files, extents in LMDB.

Layout, under ``<cache dir>/<repo id>/`` (shared by every mount of that repository on
the host, and kept across remounts; directories 0700, files 0600, the cache directory
private to its user: ``cafs.cachedir``):

- ``in-use``: an empty file, the lock that keeps ``cafs cache clear`` away while the
  cache is open (``cafs.cacheuse``).
- ``data/<xx>/<pack id hex>``: a sparse file per pack; a cached chunk's stored bytes
  (as in the pack, possibly zstd) sit at the same offset as in the pack, so neighbouring
  chunks fetched together are written with one ``pwrite``.
- LMDB database ``extents`` in ``meta.lmdb``: key ``pack id (32) + offset (8, big
  endian)`` -> value ``stored length (4) + last use (8, seconds, big endian)``, both
  unsigned. An extent is present only once its bytes are written.
- LMDB database ``cachestat``, every value 8 bytes, unsigned, big endian:
  ``b"size"`` -> total stored bytes of all extents; ``b"limit"`` -> the size limit last
  given by a mount or ``cafs prefetch`` using the cache (absent until one records it);
  ``b"hits"``, ``b"misses"`` -> chunk loads of mounts served by the cache and fetched from
  the store, ``b"fetched"`` -> stored bytes those misses read, all summed over every mount
  since the cache was made (added by each mount every few seconds; absent reads as 0);
  ``b"snapshot\0" + REPO#REF@JID`` (UTF-8, the repository as an absolute path or a URL
  without user information) -> when a mount or ``cafs prefetch`` last used that snapshot
  (seconds), the newest ``RECORDED_SNAPSHOTS`` kept, for ``cafs cache status``;
  ``b"layout"`` -> the version of this layout (``cafs.metacache.CACHE_LAYOUT``, checked
  and recorded when the cache is opened). Keys unknown to a reader are ignored, so
  adding one needs no version change; a change that an older reader would misread bumps
  the layout version.

Invariants: the recorded total never exceeds ``limit`` (unless one insert alone is
larger): an insert that passes it removes least-recently-used extents in its own
transaction until the total is at most ``limit * EVICT_TO``, and once committed punches
the whole blocks they leave unused (a block shared with a recorded extent, or with a span
this process is writing, is kept; without rounding, extents smaller than a block would
free nothing), or deletes the pack's cache file when no extent of it is left and this
process is writing none: the one way to free space on a filesystem that cannot punch
holes (exFAT, some network filesystems; the mount's log says so once), and no empty
sparse files pile up elsewhere. Bytes on disk exceed the total by the inserts in flight (written before
they are recorded) and by the shared blocks at the ends of runs of extents. Nothing read
from here is trusted: the caller verifies bytes against their id, and a damaged extent
is dropped and refetched; a record of the wrong length is a damaged LMDB file
(``unpack_record``).
All methods block (disk and LMDB): call them from worker threads, never hold a
transaction across an ``await``.

What a read returns goes to the kernel, whose page cache for the mounted file keeps it,
so the cache file's own copy is kept out of the page cache: a host caches each byte of a
dataset once, not twice. ``insert`` writes the whole 4 KiB blocks of a span of at least
``DIRECT_MIN`` bytes (1 MiB) with ``O_DIRECT`` (from a reused aligned buffer of each
thread), and only the partial blocks at its ends through the page cache; ``read`` drops the extent's
pages (``POSIX_FADV_DONTNEED``), and the freed pages are the ones the kernel reuses for
the mounted file's copy. Fresh pages cost far more than a copy on a virtual machine that
returns free memory to its host: writing 1 GiB into new page-cache pages took 1.5-2.8 s
of CPU here, ``O_DIRECT`` 0.05-0.09 s. A filesystem that refuses ``O_DIRECT`` (EINVAL)
gets buffered writes throughout.

Caveats: last-use times are kept in memory and written in batches, so the order of
eviction is approximate across processes. If the disk fills before the limit is reached,
``insert`` evicts least-recently-used extents to make room and tries once more; if the
batch still does not fit (an empty cache, a disk full of other files) it raises
``NoSpaceError`` and the caller serves without caching.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lmdb

from cafs import cachedir
from cafs.errors import CafsError, NoSpaceError
from cafs.fileio import DIRECT_ALIGN, open_files_share, pwrite_all, read_resident

log = logging.getLogger("cafs.cache")

EVICT_TO = 0.9
_EXTENT = struct.Struct(">IQ")
_SIZE = struct.Struct(">Q")
_SIZE_KEY = b"size"
_LIMIT_KEY = b"limit"
_USE_KEYS = (b"hits", b"misses", b"fetched")
_SNAPSHOT_PREFIX = b"snapshot\0"
RECORDED_SNAPSHOTS = 16
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
BLOCK = 4096  # what a punch frees whole; a block an extent shares is kept
MAX_OPEN_PACKS = 256  # cache files kept open between uses
# ... and at most this share of the open-files limit (a file may be open twice: O_DIRECT)
OPEN_FILES_FRACTION = 8
# shorter spans are written through the page cache: a small file's chunk, whose read
# would wait for the disk, while its pages cost little
DIRECT_MIN = 1 << 20
Stored = bytes | bytearray | memoryview
DIRECT_BUFFER = 1 << 20  # bytes per O_DIRECT write, the size of each thread's aligned buffer


class CacheError(CafsError):
    """The chunk cache could not be read or written (never fatal to a read)."""


def unpack_record(fmt: struct.Struct, value: bytes | memoryview) -> tuple[int, ...]:
    """``fmt.unpack(value)``. A value of another length is damage that LMDB itself does
    not see (it checksums nothing): raised as LMDB raises its own, ``lmdb.CorruptedError``,
    which every reader of the cache already meets as a damaged cache."""
    if len(value) != fmt.size:
        raise lmdb.CorruptedError(f"a cache record of {len(value)} bytes, not {fmt.size}")
    return fmt.unpack(value)


def extent_key(pack: bytes, offset: int) -> bytes:
    return pack + offset.to_bytes(8, "big")


@dataclass(frozen=True)
class CacheUsage:
    """What ``cachestat`` holds (see the module docstring)."""

    size: int
    limit: int | None  # None: no mount or prefetch recorded one yet
    extents: int
    hits: int
    misses: int
    fetched: int


@dataclass
class CacheCounters:
    evictions: int = 0
    evicted_bytes: int = 0
    insert_failures: int = 0


class ChunkCache:
    def __init__(self, root: Path, env: lmdb.Environment, limit: int) -> None:
        self.root = root
        self.env = env
        self.limit = limit
        self.extents = env.open_db(b"extents")
        self.stat = env.open_db(b"cachestat")
        self.counters = CacheCounters()
        self._touched: dict[bytes, int] = {}
        self._lock = threading.Lock()
        # Held around every write transaction that may evict and the punching after it,
        # and to change ``_writing``: the spans this process is writing or has written
        # but not yet recorded, which a punch must spare.
        self._records = threading.Lock()
        self._writing: dict[bytes, list[tuple[int, int]]] = {}
        self._fds: OrderedDict[bytes, _OpenPack] = OrderedDict()  # least recently used first
        self._open_share = open_files_share(OPEN_FILES_FRACTION)
        self._direct = True  # until the filesystem refuses O_DIRECT
        self._punch_refused = False  # said once: evictions free space only with whole packs
        self._buffers = threading.local()  # each thread's aligned buffer for O_DIRECT writes

    # -- files ----------------------------------------------------------------------

    def _path(self, pack: bytes) -> Path:
        h = pack.hex()
        return self.root / "data" / h[:2] / h

    @contextmanager
    def _pack_file(self, pack: bytes, create: bool) -> Iterator[_OpenPack | None]:
        """A pack's open cache file (None if it does not exist and ``create`` is false),
        held open for the block: at most ``MAX_OPEN_PACKS`` (and 1/``OPEN_FILES_FRACTION``
        of the open-files limit) stay open between uses, and
        one another thread is using is closed only after it."""
        with self._lock:
            entry = self._fds.get(pack)
            if entry is None:
                fd = self._open_pack(pack, create)
                if fd is None:
                    entry = None
                else:
                    entry = self._fds[pack] = _OpenPack(fd)
                    while len(self._fds) > min(MAX_OPEN_PACKS, self._open_share):
                        self._fds.popitem(last=False)[1].retire()
            else:
                self._fds.move_to_end(pack)
            if entry is not None:
                entry.users += 1
        if entry is None:
            yield None
            return
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                if entry.evicted and not entry.users:
                    entry.close()

    def _open_pack(self, pack: bytes, create: bool) -> int | None:
        path = self._path(pack)
        try:
            if create:
                cachedir.private(path.parent)
                return os.open(path, os.O_RDWR | cachedir.CREATE_FLAGS, cachedir.FILE_MODE)
            return os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError):
            if create:
                raise
            return None  # not a cache file there (damage): nothing of it cached
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"cache {self.root}: no space left on device") from None
            raise

    def close(self) -> None:
        try:
            self.flush_touches()
        except CafsError:
            pass  # last-use times only: eviction order is approximate anyway
        with self._lock:
            for entry in self._fds.values():
                entry.retire()
            self._fds.clear()

    # -- reads ----------------------------------------------------------------------

    def read(self, pack: bytes, offset: int, length: int, *, resident: bool = False) -> bytes | bytearray | None:
        """The stored bytes of the extent at ``(pack, offset)``, or None if not cached.
        With ``resident``, also None unless the page cache holds them all (``RWF_NOWAIT``:
        the read never waits for the disk), so it may be called on an event loop."""
        key = extent_key(pack, offset)
        with self.env.begin(db=self.extents) as txn:
            value = txn.get(key)
        if value is None or unpack_record(_EXTENT, value)[0] != length:
            return None
        with self._pack_file(pack, create=False) as entry:
            if entry is None:
                return None
            fd = entry.fd
            data = read_resident(fd, offset, length) if resident else os.pread(fd, length, offset)
            if data is None:
                return None
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        if len(data) != length:
            return None
        self._touched[key] = int(time.time())
        return data

    def advise(self, pack: bytes, offset: int, length: int) -> None:
        """Start reading the extent at ``(pack, offset)`` into the page cache, without
        waiting: a hint, so that a ``resident`` read soon after finds it there."""
        try:
            with self._pack_file(pack, create=False) as entry:
                if entry is not None:
                    os.posix_fadvise(entry.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # a hint; the read meets and reports the failure

    def contains(self, pack: bytes, offset: int) -> bool:
        with self.env.begin(db=self.extents) as txn:
            return txn.get(extent_key(pack, offset)) is not None

    def cached(self, extents: Iterable[tuple[bytes, int, int]]) -> list[bool]:
        """For each ``(pack, offset, stored length)``, whether that extent is recorded as
        cached: one LMDB lookup each, in one read transaction; no bytes are read."""
        out = []
        with self.env.begin(db=self.extents) as txn:
            for pack, offset, length in extents:
                value = txn.get(extent_key(pack, offset))
                out.append(value is not None and unpack_record(_EXTENT, value)[0] == length)
        return out

    def usage(self) -> CacheUsage:
        with self.env.begin(db=self.stat) as txn:
            def value(key: bytes) -> int | None:
                raw = txn.get(key)
                return unpack_record(_SIZE, raw)[0] if raw is not None else None

            hits, misses, fetched = (value(k) or 0 for k in _USE_KEYS)
            extents = txn.stat(self.extents)["entries"]
            return CacheUsage(value(_SIZE_KEY) or 0, value(_LIMIT_KEY), extents, hits, misses, fetched)

    def record_use(self, hits: int = 0, misses: int = 0, fetched: int = 0) -> None:
        """Add to the persistent use counters and record ``limit`` as this cache's limit.
        Raises CacheError (or NoSpaceError) if LMDB cannot be written."""
        try:
            with self.env.begin(write=True, db=self.stat) as txn:
                for key, delta in zip(_USE_KEYS, (hits, misses, fetched)):
                    if delta:
                        raw = txn.get(key)
                        txn.put(key, _SIZE.pack((unpack_record(_SIZE, raw)[0] if raw else 0) + delta))
                txn.put(_LIMIT_KEY, _SIZE.pack(self.limit))
        except lmdb.Error as exc:
            raise self._write_failed(exc, "its counters") from None

    def record_snapshot(self, source: str) -> None:
        """Note that ``source`` (``REPO#REF@JID``) uses this cache, keeping the newest
        ``RECORDED_SNAPSHOTS``. Raises CacheError (or NoSpaceError) like ``record_use``."""
        try:
            with self.env.begin(write=True, db=self.stat) as txn:
                txn.put(_SNAPSHOT_PREFIX + source.encode("utf-8", "surrogateescape"), _SIZE.pack(int(time.time())))
                recorded = self._recorded(txn)
                for key, _when in recorded[RECORDED_SNAPSHOTS:]:
                    txn.delete(key)
        except lmdb.Error as exc:
            raise self._write_failed(exc, "a snapshot") from None

    def _write_failed(self, exc: lmdb.Error, what: str) -> CacheError | NoSpaceError:
        """The error to raise for an LMDB write of ``what`` that failed with ``exc``."""
        if isinstance(exc, lmdb.MapFullError) or "No space" in str(exc):
            return NoSpaceError(f"cache {self.root}: no space left to record {what}")
        return CacheError(f"cache {self.root}: cannot record {what}: {exc}")

    def recorded_snapshots(self) -> list[str]:
        """The snapshots recorded by ``record_snapshot``, most recently used first."""
        with self.env.begin(db=self.stat) as txn:
            return [key[len(_SNAPSHOT_PREFIX):].decode("utf-8", "surrogateescape")
                    for key, _when in self._recorded(txn)]

    def _recorded(self, txn: lmdb.Transaction) -> list[tuple[bytes, int]]:
        out: list[tuple[bytes, int]] = []
        cursor = txn.cursor()
        if cursor.set_range(_SNAPSHOT_PREFIX):
            for key, value in cursor:
                key = bytes(key)
                if not key.startswith(_SNAPSHOT_PREFIX):
                    break
                out.append((key, unpack_record(_SIZE, value)[0]))
        return sorted(out, key=lambda kv: -kv[1])

    # -- writes ---------------------------------------------------------------------

    def insert(self, pack: bytes, extents: Sequence[tuple[int, Stored]]) -> None:
        """Write each ``(offset, stored bytes)`` of ``pack`` and record them as cached, in
        one LMDB transaction (``insert_batch`` of one pack)."""
        self.insert_batch([(pack, extents)])

    def insert_batch(self, batch: Sequence[tuple[bytes, Sequence[tuple[int, Stored]]]]) -> None:
        """Write each ``(offset, stored bytes)`` of each ``(pack, extents)`` and record them
        all as cached, in one LMDB transaction. Extents of a pack that touch are written
        as one span. If the disk is full, least-recently-used extents are evicted to make
        room (``make_room``) and the batch is tried once more. Raises NoSpaceError if it
        still does not fit (nothing of this call is recorded then, and what it wrote is
        punched out again)."""
        try:
            self._insert_batch(batch)
        except NoSpaceError:
            if not self.make_room(sum(len(stored) for _pack, extents in batch for _off, stored in extents)):
                raise
            self._insert_batch(batch)

    def make_room(self, needed: int) -> bool:
        """Evict least-recently-used extents so that ``needed`` bytes more, and a tenth of
        what stays, fit where the disk filled up before the limit (a limit larger than
        the disk, or a disk others fill): the cache then stays as large as its disk allows,
        and keeps the chunks read last rather than the first ones read. Whether anything
        was evicted."""
        try:
            with self._records:
                with self.env.begin(write=True) as txn:
                    total = self._total(txn)
                    victims = self._evict_in(txn, int(max(0, total - needed) * EVICT_TO)) if total else []
                self._punch_all(victims)
        except lmdb.Error:
            return False  # a disk too full even for LMDB's pages: nothing to gain
        return bool(victims)

    def _insert_batch(self, batch: Sequence[tuple[bytes, Sequence[tuple[int, Stored]]]]) -> None:
        spans = [(pack, off, off + len(stored)) for pack, extents in batch for off, stored in extents]
        with self._records:
            self._announce(spans)
        try:
            self._write_batch(batch)
        except BaseException:
            with self._records:
                self._withdraw(spans)
                self._unwrite(spans)
            raise
        self._record_batch(batch, spans)

    def _unwrite(self, spans: list[tuple[bytes, int, int]]) -> None:
        """Punch out what an insert that failed wrote (``_records`` held, ``spans``
        withdrawn): nothing records those bytes, so no eviction would ever free them, and
        on a full disk they would keep it full. A block shared with a recorded extent or a
        span being written is kept, as is an extent another insert recorded meanwhile."""
        try:
            with self.env.begin(db=self.extents) as txn:
                holes = [(pack, self._hole(txn, extent_key(pack, lo), hi - lo)) for pack, lo, hi in spans
                         if txn.get(extent_key(pack, lo)) is None]
        except lmdb.Error:
            return  # nothing known of the neighbours: better to leave the bytes than to punch theirs
        for pack, hole in holes:
            if hole is not None:
                self._punch(pack, *hole)

    def _write_batch(self, batch: Sequence[tuple[bytes, Sequence[tuple[int, Stored]]]]) -> None:
        try:
            for pack, extents in batch:
                with self._pack_file(pack, create=True) as entry:
                    assert entry is not None
                    for start, span in _spans(extents):
                        self._write_span(entry, start, span)
        except OSError as exc:
            self.counters.insert_failures += 1
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"cache {self.root}: no space left on device") from None
            raise

    def _announce(self, spans: list[tuple[bytes, int, int]]) -> None:
        for pack, lo, hi in spans:
            self._writing.setdefault(pack, []).append((lo, hi))

    def _withdraw(self, spans: list[tuple[bytes, int, int]]) -> None:
        for pack, lo, hi in spans:
            ranges = self._writing[pack]
            ranges.remove((lo, hi))
            if not ranges:
                del self._writing[pack]

    def _record_batch(self, batch: Sequence[tuple[bytes, Sequence[tuple[int, Stored]]]],
                      spans: list[tuple[bytes, int, int]]) -> None:
        now = int(time.time())
        with self._records:
            # recorded by the transaction below before the lock is released, and its own
            # evictions must not spare them as if written by another thread
            self._withdraw(spans)
            try:
                with self.env.begin(write=True) as txn:
                    added = 0
                    fresh = set()
                    for pack, extents in batch:
                        for off, stored in extents:
                            key = extent_key(pack, off)
                            if txn.get(key, db=self.extents) is None:
                                added += len(stored)
                            txn.put(key, _EXTENT.pack(len(stored), now), db=self.extents)
                            fresh.add(key)
                    total = self._total(txn) + added
                    txn.put(_SIZE_KEY, _SIZE.pack(total), db=self.stat)
                    # evicting in the same transaction keeps the recorded total within the
                    # limit however many writers insert at once
                    victims = self._evict_in(txn, int(self.limit * EVICT_TO), fresh) if total > self.limit else []
            except lmdb.Error as exc:
                self.counters.insert_failures += 1
                self._unwrite(spans)
                raise self._write_failed(exc, "an extent") from None
            self._punch_all(victims)

    def _write_span(self, entry: _OpenPack, start: int, pieces: list[memoryview]) -> None:
        """Write ``pieces`` one after the other from ``start``: the whole blocks with
        O_DIRECT when there are enough of them and the filesystem allows, the rest
        through the page cache."""
        end = start + sum(len(p) for p in pieces)
        first, last = _round_up(start, DIRECT_ALIGN), _round_down(end, DIRECT_ALIGN)
        buffered = [(start, end)]
        if self._direct and last - first >= DIRECT_MIN:
            stop = self._write_direct(entry, pieces, start, first, last)
            buffered = [(start, first), (stop, end)]
        for lo, hi in buffered:
            for view in _window(pieces, start, lo, hi):
                pwrite_all(entry.fd, view, lo)
                lo += len(view)

    def _write_direct(self, entry: _OpenPack, pieces: list[memoryview], start: int, first: int, last: int) -> int:
        """Write bytes ``[first, last)`` (whole blocks) of ``pieces``, which begin at
        ``start``, with O_DIRECT through this thread's aligned buffer. Returns where the
        O_DIRECT writes stopped: ``last``, unless the filesystem refused (which turns
        O_DIRECT off for this cache) or wrote short."""
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None:
            buffer = self._buffers.buffer = mmap.mmap(-1, DIRECT_BUFFER)  # page-aligned
        pos = first
        try:
            fd = self._direct_fd(entry)
            while pos < last:
                n = 0
                for view in _window(pieces, start, pos, min(last, pos + DIRECT_BUFFER)):
                    buffer[n:n + len(view)] = view
                    n += len(view)
                written = os.pwrite(fd, memoryview(buffer)[:n], pos)
                if written <= 0 or written % DIRECT_ALIGN:
                    break  # an odd short write: the page cache writes the rest
                pos += written
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct = False
        return pos

    def _direct_fd(self, entry: _OpenPack) -> int:
        with self._lock:
            if entry.direct is None:
                # the same file as entry.fd, even if its name was replaced meanwhile
                entry.direct = os.open(f"/proc/self/fd/{entry.fd}", os.O_WRONLY | os.O_DIRECT)
            return entry.direct

    def drop(self, pack: bytes, offset: int) -> None:
        """Forget one extent (its bytes were found damaged). Raises NoSpaceError or
        CacheError if LMDB cannot be written."""
        try:
            with self.env.begin(write=True) as txn:
                value = txn.get(extent_key(pack, offset), db=self.extents)
                if value is None:
                    return
                txn.delete(extent_key(pack, offset), db=self.extents)
                txn.put(_SIZE_KEY, _SIZE.pack(max(0, self._total(txn) - unpack_record(_EXTENT, value)[0])), db=self.stat)
        except lmdb.Error as exc:
            raise self._write_failed(exc, "a damaged extent") from None

    def _total(self, txn: lmdb.Transaction) -> int:
        value = txn.get(_SIZE_KEY, db=self.stat)
        return unpack_record(_SIZE, value)[0] if value else 0

    def size(self) -> int:
        with self.env.begin() as txn:
            return self._total(txn)

    def size_or_unknown(self) -> int:
        """``size``, or -1 if the LMDB file cannot be read (damaged: the mount's counters
        say so rather than fail)."""
        try:
            return self.size()
        except lmdb.Error:
            return -1

    def flush_touches(self) -> bool:
        """Write batched last-use times of extents read since the last flush (those of a
        flush that fails are dropped: eviction order is approximate anyway); whether
        there were any. Raises NoSpaceError or CacheError if LMDB cannot be written."""
        if not self._touched:
            return False
        try:
            with self.env.begin(write=True) as txn:
                self._write_touches(txn)
        except lmdb.Error as exc:
            raise self._write_failed(exc, "when extents were last used") from None
        return True

    def _write_touches(self, txn: lmdb.Transaction) -> None:
        touched, self._touched = self._touched, {}
        for key, when in touched.items():
            value = txn.get(key, db=self.extents)
            if value is not None:
                txn.put(key, _EXTENT.pack(unpack_record(_EXTENT, value)[0], when), db=self.extents)

    def evict(self, target: int) -> None:
        """Remove least-recently-used extents until the total is at most ``target``."""
        with self._records:
            with self.env.begin(write=True) as txn:
                victims = self._evict_in(txn, target)
            self._punch_all(victims)

    def _evict_in(self, txn: lmdb.Transaction, target: int, fresh: Collection[bytes] = ()) -> list[_Victim]:
        """In write transaction ``txn`` (``_records`` held), forget least-recently-used
        extents until the total is at most ``target``, the keys in ``fresh`` (just
        inserted) last of those last used in the same second; returns them with the
        blocks to punch once ``txn`` is committed."""
        self._write_touches(txn)
        total = self._total(txn)
        if total <= target:
            return []
        items = sorted((unpack_record(_EXTENT, v)[1], k in fresh, bytes(k), unpack_record(_EXTENT, v)[0])
                       for k, v in txn.cursor(db=self.extents))
        forgotten = []
        for _when, _fresh, key, length in items:
            if total <= target:
                break
            txn.delete(key, db=self.extents)
            total -= length
            forgotten.append((key, length))
        txn.put(_SIZE_KEY, _SIZE.pack(max(0, total)), db=self.stat)
        # after every deletion, so that neighbours evicted together free the block they share
        emptied = {pack for pack in {key[:32] for key, _length in forgotten} if self._emptied(txn, pack)}
        return [_Victim(key, length, self._hole(txn, key, length), key[:32] in emptied)
                for key, length in forgotten]

    def _emptied(self, txn: lmdb.Transaction, pack: bytes) -> bool:
        """Whether ``pack`` has no recorded extent left and no span this process writes."""
        if pack in self._writing:
            return False
        cursor = txn.cursor(db=self.extents)
        return not (cursor.set_range(pack) and cursor.key()[:32] == pack)

    def _hole(self, txn: lmdb.Transaction, key: bytes, length: int) -> tuple[int, int] | None:
        """The whole blocks that forgetting extent ``key`` of ``length`` bytes frees:
        those it covers, save any shared with a recorded extent or a span being written.
        None if the extent itself is being written again."""
        pack, start = key[:32], int.from_bytes(key[32:], "big")
        end = start + length
        lo, hi = _round_down(start, BLOCK), _round_up(end, BLOCK)
        for n_start, n_end in [*self._recorded_neighbours(txn, key), *self._writing.get(pack, ())]:
            if n_end <= start:
                lo = max(lo, _round_up(n_end, BLOCK))
            elif n_start >= end:
                hi = min(hi, _round_down(n_start, BLOCK))
            else:
                return None
        return (lo, hi) if lo < hi else None

    def _recorded_neighbours(self, txn: lmdb.Transaction, key: bytes) -> Iterator[tuple[int, int]]:
        """The ``(start, end)`` of the recorded extents of the same pack just before and
        just after ``key`` (itself not recorded)."""
        cursor = txn.cursor(db=self.extents)
        if cursor.set_range(key):
            yield from _same_pack(cursor, key)
            before = cursor.prev()
        else:
            before = cursor.last()
        if before:
            yield from _same_pack(cursor, key)

    def _punch_all(self, victims: list[_Victim]) -> None:
        for pack in {v.key[:32] for v in victims if v.emptied}:
            self._delete_file(pack)
        for victim in victims:
            if victim.hole is not None and not victim.emptied:
                self._punch(victim.key[:32], *victim.hole)
        self.counters.evictions += len(victims)
        self.counters.evicted_bytes += sum(v.length for v in victims)

    def _punch(self, pack: bytes, lo: int, hi: int) -> None:
        with self._pack_file(pack, create=False) as entry:
            if entry is None:
                return
            try:
                _fallocate(entry.fd, _FALLOC_PUNCH, lo, hi - lo)
            except OSError as exc:  # the extent is already forgotten; a later read refetches
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS) and not self._punch_refused:
                    self._punch_refused = True
                    log.warning("cache %s: its filesystem cannot punch holes (%s), so evicted chunks free "
                                "their space only once every chunk of their pack is evicted; the cache may "
                                "take more than cache_size on disk", self.root, exc.strerror)

    def _delete_file(self, pack: bytes) -> None:
        """Delete the cache file of a pack none of whose extents is recorded
        (``_records`` held); a descriptor another thread is using closes after it."""
        with self._lock:
            entry = self._fds.pop(pack, None)
            if entry is not None:
                entry.retire()
        try:
            os.unlink(self._path(pack))
        except OSError:
            pass  # gone already, or damage in the cache directory that reads step around


@dataclass(frozen=True)
class _Victim:
    """An evicted extent and the blocks to punch for it (None: none), or whether its
    pack's cache file is to be deleted instead: no extent of the pack is left."""

    key: bytes
    length: int
    hole: tuple[int, int] | None
    emptied: bool = False


def _same_pack(cursor: lmdb.Cursor, key: bytes) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` of the extent at ``cursor`` if it is of ``key``'s pack."""
    if cursor.key()[:32] == key[:32]:
        offset = int.from_bytes(cursor.key()[32:], "big")
        yield offset, offset + unpack_record(_EXTENT, cursor.value())[0]


def _round_down(offset: int, unit: int) -> int:
    return offset // unit * unit


def _round_up(offset: int, unit: int) -> int:
    return -(-offset // unit) * unit


class _OpenPack:
    __slots__ = ("fd", "direct", "users", "evicted")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct: int | None = None  # the same file opened with O_DIRECT, once needed
        self.users = 0  # threads between taking and giving back the descriptors
        self.evicted = False  # out of the table: closed when the last user is done

    def retire(self) -> None:
        """Out of the table (the caller holds the lock): closed now if unused."""
        self.evicted = True
        if not self.users:
            self.close()

    def close(self) -> None:
        os.close(self.fd)
        if self.direct is not None:
            os.close(self.direct)


def _spans(extents: Sequence[tuple[int, Stored]]) -> Iterator[tuple[int, list[memoryview]]]:
    """``extents`` as ``(offset, pieces)`` spans: the extents that touch, in order."""
    ordered = sorted(extents, key=lambda e: e[0])
    i = 0
    while i < len(ordered):
        start, end = ordered[i][0], ordered[i][0]
        pieces = []
        while i < len(ordered) and ordered[i][0] == end:
            pieces.append(memoryview(ordered[i][1]))
            end += len(ordered[i][1])
            i += 1
        yield start, pieces


def _window(pieces: list[memoryview], start: int, lo: int, hi: int) -> Iterator[memoryview]:
    """The parts of ``pieces`` (laid end to end from ``start``) covering ``[lo, hi)``."""
    pos = start
    for view in pieces:
        a, b = max(lo, pos), min(hi, pos + len(view))
        if a < b:
            yield view[a - pos:b - pos]
        pos += len(view)



@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return libc


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    # os has no fallocate with flags; hole punching needs the libc call
    if _libc().fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))

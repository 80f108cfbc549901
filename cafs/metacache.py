"""The local metadata cache: verified node bytes in LMDB, and decoded nodes in memory.

One LMDB environment per repository per host, at ``<cache dir>/<repo id>/meta.lmdb``
(files 0600 in a private directory: ``cafs.cachedir``), database ``nodes``: node id (32 bytes) -> the node's plain msgpack bytes. Several
processes may open it at once (LMDB's own locking). Bytes read back are verified
against their id before use, so a damaged cache is detected and refetched, never
trusted. Import writes every node it creates here; readers fill it on first use. While
open, a ``MetaCache`` holds the cache's shared in-use lock (``cafs.cacheuse``), so that
``cafs cache clear`` does not delete it under this process.

LMDB does not checksum its pages: a damaged page may only show when a read or write
meets it (``MetaCacheError`` with ``damaged``). A ``NodeReader`` then stops using the
cache and reads every node from the repository, with one warning naming the cache and
``cafs fsck --cache --repair``, which moves the file aside (as ``open_mending`` does
with a file LMDB refuses to open). A file shorter than the pages its meta page says
are in use (truncated) is refused at open like one LMDB refuses: LMDB itself would meet
the missing pages as a SIGBUS that kills the process.

The map reserves 1 TiB of addresses, or a quarter of the process's limit of address
space (``ulimit -v``) where that is lower (``map_size``).

The cache's layout (this file's database, ``cafs.chunkcache``'s, the files under
``data/``, as docs/FORMAT.md lists them) has a version, ``CACHE_LAYOUT``, kept in the
database ``cachestat`` under ``b"layout"`` (8 bytes, unsigned, big endian); a change to
the layout that a cafs reading the older one would misread bumps it, and a later layout
keeps this key where it is, so that every cafs can tell. Version 1 is the layout of
every cache made before the key was: opening one without it records 1. Opening a cache
of a newer layout (a newer cafs on this host, or on one sharing the directory) raises
``CacheLayoutError`` naming it and its version, before anything is written into it: it
is not damaged, so it is not set aside either.

A process killed inside read transactions (``kill -9``, the OOM killer, a busy mount)
leaves their slots in LMDB's reader table (126) taken for as long as any other process
keeps the file open; once all are taken, no process can begin a transaction, nor open
the file (py-lmdb begins one to open it). So opening frees the slots of dead processes
(``reader_check``), so does a read that finds the table full, and a mount does every
few seconds (``free_stale_readers``).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from pathlib import Path

import lmdb

from cafs import cachedir, cacheuse
from cafs.errors import CafsError, FormatError, IntegrityError, NoSpaceError, StoreError, StoreUnavailable
from cafs.format.location import Location
from cafs.format.nodes import DirIndexNode, Node, TreeNode, decode_node
from cafs.ids import digest
from cafs.repository import Repository

log = logging.getLogger("cafs.metacache")

MAP_SIZE = 1 << 40  # address space only; the file grows with use
MAP_SHARE = 4  # under a limit of address space (ulimit -v), the map takes a quarter of it
DECODED_ITEMS = 1 << 18  # entries, spans and pages kept decoded: some 160 MB (about 600 bytes each)
WHOLE_PACK_AFTER = 2  # nodes needed from one remote metadata pack before it is read whole
CACHE_LAYOUT = 1  # the version of the cache's layout: see the module docstring
LAYOUT_KEY = b"layout"  # in database ``cachestat``


class MetaCacheError(CafsError):
    """The local metadata cache cannot be opened or written. ``damaged``: its file is
    there but is not a sound LMDB file (as opposed to a directory that cannot be
    written, which moving the file aside would not mend)."""

    def __init__(self, message: str, *, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


class CacheLayoutError(MetaCacheError):
    """The cache has a newer layout than this cafs reads (see the module docstring)."""


_DAMAGED = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.VersionMismatchError, lmdb.PanicError,
            lmdb.PageNotFoundError, lmdb.IncompatibleError)


def default_cache_dir(env: dict[str, str]) -> Path:
    if env.get("CAFS_CACHE_DIR"):
        return Path(env["CAFS_CACHE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/cafs")
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME", "/tmp"), ".cache")
    return Path(base) / "cafs"


def map_size() -> int:
    """The size of LMDB's map: ``MAP_SIZE``, or a share of this process's limit of
    address space if that is lower. The map only reserves addresses, but under ``ulimit
    -v`` (common on shared clusters, and below 1 TiB) reserving MAP_SIZE failed with
    ENOMEM, so no command could open the cache and no mount could be made. A map too
    small for what is cached later makes writes fail as a full cache (``NoSpaceError``);
    LMDB maps a file larger than the size asked whole."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return MAP_SIZE
    return min(MAP_SIZE, soft // MAP_SHARE)


def _open_env(path: Path) -> tuple[lmdb.Environment, lmdb._Database]:
    try:
        _reserve_lock_file(path / "meta.lmdb")
        # Everything here is verified on use and can be refetched, so commits need
        # not be durable: sync=False keeps a write from costing an fsync.
        env = lmdb.open(str(path / "meta.lmdb"), map_size=map_size(), max_dbs=8, mode=cachedir.FILE_MODE,
                        subdir=True, readahead=False, metasync=False, sync=False)
        try:
            env.reader_check()  # slots of dead processes: see the module docstring
            _check_length(env, path / "meta.lmdb" / "data.mdb")
            _check_layout(env, path)
            return env, env.open_db(b"nodes")  # where a damaged page may show first
        except BaseException:
            env.close()
            raise
    except CacheLayoutError:
        raise
    except (OSError, lmdb.Error) as exc:
        raise MetaCacheError(f"cannot open the metadata cache in {path}: {exc}",
                             damaged=isinstance(exc, _DAMAGED)) from None


LOCK_FILE_BYTES = 8192  # what LMDB makes of its default 126 readers (64 bytes each, and a header)


def _reserve_lock_file(lmdb_dir: Path) -> None:
    """Allocate the blocks of LMDB's lock file before LMDB maps and writes it.

    LMDB sizes ``lock.mdb`` with ftruncate and writes it through a shared mapping; on a
    full tmpfs (a cache under /tmp, a memory-backed volume) the first write to a page
    that has no block yet is a SIGBUS that kills the process. Allocated here, a full
    disk is an OSError (ENOSPC) instead."""
    cachedir.private(lmdb_dir)
    fd = os.open(lmdb_dir / "lock.mdb", os.O_RDWR | cachedir.CREATE_FLAGS, cachedir.FILE_MODE)
    try:
        os.posix_fallocate(fd, 0, max(LOCK_FILE_BYTES, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _check_layout(env: lmdb.Environment, path: Path) -> None:
    """Raise ``CacheLayoutError`` if the cache has a newer layout than ``CACHE_LAYOUT``,
    having written nothing; record the layout in a cache without one (see the module
    docstring)."""
    try:
        stat = env.open_db(b"cachestat", create=False)
    except lmdb.NotFoundError:
        layout = None  # a new cache
    else:
        try:
            with env.begin(db=stat) as txn:
                value = txn.get(LAYOUT_KEY)
        except lmdb.BadTxnError as exc:  # what a damaged page under the record makes of the get
            raise lmdb.CorruptedError(str(exc)) from None
        # a record of another length is damage, met as the other records' is (by a read)
        layout = None if value is None else int.from_bytes(value, "big") if len(value) == 8 else 0
    if layout is not None and layout > CACHE_LAYOUT:
        raise CacheLayoutError(f"the cache in {path} has layout version {layout}, which a newer cafs made; this cafs "
                               f"reads layout {CACHE_LAYOUT}: upgrade cafs on this host, or give it another cache "
                               "directory (--cache DIR; for a mount, -o cache=DIR)")
    if layout is None:
        try:
            stat = env.open_db(b"cachestat")
            with env.begin(db=stat, write=True) as txn:
                txn.put(LAYOUT_KEY, CACHE_LAYOUT.to_bytes(8, "big"), overwrite=False)
        except (lmdb.MapFullError, lmdb.DiskError):
            pass  # a full disk: recorded at a later open; a cache without the key is of layout 1


class _Truncated(lmdb.CorruptedError):  # so one of _DAMAGED
    """The LMDB file is shorter than the pages its meta page says are in use."""


def _check_length(env: lmdb.Environment, data: Path) -> None:
    """Raise unless ``data`` holds every page the newest meta page says is in use.

    LMDB maps the file and trusts it: a page past the end of a truncated file (a full
    disk, a damaged filesystem, a careless copy) is a SIGBUS that kills the process,
    with no error to catch. Committed pages are written before the meta page that names
    them, and the file only grows, so a sound file is never shorter than this."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.stat(data).st_size
    if size < needed:
        raise _Truncated(f"{data}: {size} bytes, but its pages in use need {needed}: truncated")


class MetaCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._in_use = cacheuse.hold(path)  # until close: no cafs cache clear meanwhile
        except OSError as exc:
            raise MetaCacheError(f"cannot open the metadata cache in {path}: {exc}") from None
        try:
            self.env, self.nodes_db = _open_env(path)
        except BaseException:
            os.close(self._in_use)
            raise

    @classmethod
    def open_mending(cls, path: Path) -> MetaCache:
        """The cache at ``path``; one that is damaged (everything in it can be fetched
        again) is moved aside to ``meta.lmdb.damaged-<time>``, with a warning, and an
        empty one started."""
        try:
            return cls(path)
        except MetaCacheError as exc:
            if not exc.damaged:
                raise
            aside = path / f"meta.lmdb.damaged-{int(time.time())}"
            log.warning("%s; moving it to %s and starting an empty cache", exc, aside)
        os.replace(path / "meta.lmdb", aside)
        return cls(path)

    def close(self) -> None:
        try:
            self.env.sync(True)
            self.env.close()
        finally:
            os.close(self._in_use)

    def get(self, node_id: bytes) -> bytes | None:
        try:
            try:
                return self._get(node_id)
            except lmdb.ReadersFullError:
                if not self.free_stale_readers():
                    raise
                return self._get(node_id)
        except lmdb.Error as exc:
            raise self._failed("reading", exc) from None

    def _get(self, node_id: bytes) -> bytes | None:
        with self.env.begin(db=self.nodes_db) as txn:
            data = txn.get(node_id)
            return bytes(data) if data is not None else None

    def _failed(self, doing: str, exc: lmdb.Error) -> MetaCacheError:
        return MetaCacheError(f"{doing} the metadata cache in {self.path}: {exc}", damaged=isinstance(exc, _DAMAGED))

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        try:
            with self.env.begin(db=self.nodes_db, write=True) as txn:
                for key, value in items:
                    txn.put(key, value, overwrite=False)
        except lmdb.MapFullError:
            raise NoSpaceError("the metadata cache is full") from None
        except lmdb.Error as exc:
            if "No space left" in str(exc):
                raise NoSpaceError(f"no space left on device for the metadata cache: {exc}") from None
            raise self._failed("writing", exc) from None

    def free_stale_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (see
        the module docstring); how many. A long-lived holder (a mount) calls it now and
        then, so that such slots never pile up while it keeps the file open."""
        try:
            return int(self.env.reader_check())
        except lmdb.Error:
            return 0  # the next read meets and reports what is wrong

    def delete(self, node_id: bytes) -> None:
        try:
            with self.env.begin(db=self.nodes_db, write=True) as txn:
                txn.delete(node_id)
        except lmdb.Error as exc:
            raise self._failed("writing", exc) from None


def node_weight(node: Node) -> int:
    """What a decoded node holds, in the items ``DECODED_ITEMS`` counts."""
    if isinstance(node, TreeNode):
        return 1 + len(node.entries)
    if isinstance(node, DirIndexNode):
        return 1 + len(node.pages)
    return 1 + len(node.spans)


class DecodedNodes:
    """Decoded nodes by id, the least recently used dropped once they hold more than
    ``budget`` items (``node_weight``); the newest is kept whatever its size. Weighed, not
    counted: a directory page holds up to 1024 entries and a file node up to a million
    spans, so a bound of 4096 nodes let a mount hold gigabytes."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = DECODED_ITEMS if budget is None else budget
        self.weight = 0
        self._nodes: OrderedDict[bytes, tuple[Node, int]] = OrderedDict()

    def get(self, node_id: bytes) -> Node | None:
        hit = self._nodes.get(node_id)
        if hit is None:
            return None
        self._nodes.move_to_end(node_id)
        return hit[0]

    def put(self, node_id: bytes, node: Node) -> None:
        old = self._nodes.pop(node_id, None)
        if old is not None:
            self.weight -= old[1]
        weight = node_weight(node)
        self._nodes[node_id] = (node, weight)
        self.weight += weight
        while self.weight > self.budget and len(self._nodes) > 1:
            self.weight -= self._nodes.popitem(last=False)[1][1]


class NodeNotLoaded(CafsError):
    """A node is neither in memory nor in LMDB, and this reader does not go to the store
    itself: the caller loads it (``NodeReader.load``, in a worker thread), hands it over
    (``NodeReader.loaded``) and tries again."""

    def __init__(self, loc: Location) -> None:
        super().__init__(f"node {loc.id.hex()[:16]} is not loaded yet")
        self.loc = loc


class NodeReader:
    """Reads nodes by location: memory, then LMDB, then the repository; always verified.

    With ``defer_writes`` (the mount), nodes fetched from the repository are not written
    to LMDB at once: ``take_pending`` hands them over so the caller can write them from a
    worker thread, keeping LMDB write transactions off its event loop; until then they
    are read from memory. With ``defer_fetches`` (the mount), a node that must come from
    the store raises ``NodeNotLoaded`` instead, so that no store read ever runs on the
    event loop.

    On a remote repository, the second node this reader needs from one metadata pack
    brings the rest of that pack with it, in one read (``load``). A walk of a tree (find,
    ls -R, a get, an incremental import) needs most nodes of the packs it meets; one
    request per directory would cost it the store's first-byte latency (10-200 ms) per
    directory, where this costs it about one per pack. A single lookup reads one node
    alone, as before. Not thread-safe, except ``load``."""

    def __init__(self, repo: Repository, cache: MetaCache | None, *, defer_writes: bool = False,
                 defer_fetches: bool = False) -> None:
        self.repo = repo
        self.cache = cache
        self.defer_writes = defer_writes
        self.defer_fetches = defer_fetches
        self._pending: dict[bytes, bytes] = {}
        self._decoded = DecodedNodes()
        self._whole_packs = repo.local_root is None  # a local disk has no latency to save
        self._pack_reads: dict[bytes, int] = {}  # metadata pack -> its nodes read one by one
        self._packs_read_whole: set[bytes] = set()
        self._lock = threading.Lock()  # over the two above: ``load`` runs in worker threads

    def take_pending(self) -> list[tuple[bytes, bytes]]:
        pending, self._pending = self._pending, {}
        return list(pending.items())

    def node_bytes(self, loc: Location) -> bytes:
        pending = self._pending.get(loc.id)
        if pending is not None:
            return pending
        if self.cache is not None:
            try:
                data = self.cache.get(loc.id)
                if data is not None:
                    if digest(data) == loc.id:
                        return data
                    self.cache.delete(loc.id)  # damaged behind our back: refetch
            except MetaCacheError as exc:
                self.give_up_cache(exc)
        if self.defer_fetches:
            raise NodeNotLoaded(loc)
        nodes = self.load(loc)
        self._keep(nodes)
        return nodes[0][1]

    def give_up_cache(self, exc: MetaCacheError) -> None:
        """Read on without the cache, which failed (``exc``): every node from the repository."""
        if self.cache is not None:
            log.warning("%s; reading from the repository without it (cafs fsck REPO --cache --repair "
                        "sets the damaged file aside)", exc)
            self.cache = None
            self._pending.clear()

    def load(self, loc: Location) -> list[tuple[Location, bytes]]:
        """Node ``loc`` and its verified bytes from the repository, first, then those of
        the other nodes of its pack when this reader reads that pack whole (see the class
        docstring). Thread-safe: for worker threads."""
        if self._read_whole(loc.pack):
            try:
                nodes = self.repo.read_nodes_of(loc.pack)
            except StoreUnavailable:
                raise  # a read of the one node would wait out the same store
            except (FormatError, StoreError) as exc:  # read alone below (gc moved it, say)
                log.debug("metadata pack %s not read whole: %s", loc.pack.hex(), exc)
            else:
                wanted = [node for node in nodes if node[0].id == loc.id]
                if wanted:
                    return wanted + [node for node in nodes if node[0].id != loc.id]
        return [(loc, self.repo.read_object(loc))]

    def _read_whole(self, pack: bytes) -> bool:
        """Whether to read ``pack`` whole now: the second node needed from it, once."""
        if not self._whole_packs:
            return False
        with self._lock:
            if pack in self._packs_read_whole:
                return False
            reads = self._pack_reads[pack] = self._pack_reads.get(pack, 0) + 1
            if reads < WHOLE_PACK_AFTER:
                return False
            del self._pack_reads[pack]
            self._packs_read_whole.add(pack)
            return True

    def loaded(self, nodes: list[tuple[Location, bytes]]) -> None:
        """Take what ``load`` returned: the first node decoded into memory, every one on
        its way to LMDB."""
        loc, data = nodes[0]
        self._remember(loc.id, decode_node(data, f"node {loc.id.hex()[:12]}"))
        self._keep(nodes)

    def _keep(self, nodes: list[tuple[Location, bytes]]) -> None:
        if self.cache is not None and self.defer_writes:
            self._pending.update((loc.id, data) for loc, data in nodes)
        elif self.cache is not None:
            try:
                self.cache.put_many([(loc.id, data) for loc, data in nodes])
            except MetaCacheError as exc:
                self.give_up_cache(exc)
            except CafsError:
                pass  # a cache that cannot be written only costs speed

    def node(self, loc: Location) -> Node:
        hit = self._decoded.get(loc.id)
        if hit is not None:
            return hit
        node = decode_node(self.node_bytes(loc), f"node {loc.id.hex()[:12]}")
        self._remember(loc.id, node)
        return node

    def _remember(self, node_id: bytes, node: Node) -> None:
        self._decoded.put(node_id, node)


__all__ = ["CACHE_LAYOUT", "CacheLayoutError", "DecodedNodes", "MetaCache", "NodeReader", "NodeNotLoaded", "default_cache_dir", "IntegrityError"]

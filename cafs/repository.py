"""A repository: a store plus its config, refs journals, index and object reads.

Owns the repository layout (see docs/FORMAT.md):

    config                   the config (JSON)
    packs/XX/<pack id>       packs of chunks (data) and of nodes (metadata)
    index/<digest>           index objects: which pack holds which object
    refs/<name>/<jid>        one journal entry per snapshot of a ref
    refs/<name>/latest       advisory: the newest jid, for stores that cannot list keys

It does not cache: callers that read nodes repeatedly go through ``cafs.metacache``.
Every object read here is verified against its id before it is returned.

Reads go through ``cafs.sources``: the repository's own store first, then any mirrors
given to ``open``, with failover, retries and a deadline; corrupt bytes from one source
count as that source's failure. A mirror is read only once its config shows the same
repository (``MirrorOf``): another repository answers the same names (``refs/``) with
another dataset. Writes go to the repository's own store only (``store``: retried on
``StoreUnavailable`` until the deadline); ``primary`` is that store unwrapped.

A location is a hint. Objects are named by their content, so when ``cafs gc`` repacks a
pack, the live objects move, verbatim (same stored bytes, codec and lengths), to new
packs, and the old pack is deleted. A read whose pack is gone finds the object by id in
the repository index (reloaded every ``RELOCATION_RELOAD`` seconds at most, and at once
when it still names a pack a read found gone: another gc moved the objects on), in
whatever form it is stored there: hosts that compress differently (another zstd version or
level) store one chunk in two forms, and gc keeps an object once, in either.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from cafs.errors import (
    CafsError, FormatError, IntegrityError, ListingUnavailable, ObjectNotFound, OtherRepository, RefError,
    RepositoryError, StoreError,
)
from cafs.format import FORMAT_VERSION
from cafs.format.config import ChunkerParams, RepoConfig, check_config, decode_config, encode_config
from cafs.format.index import PackSummary, decode_index, encode_index
from cafs.format.journal import (
    Snapshot, check_ref_name, decode_latest, decode_snapshot, encode_latest, encode_snapshot,
    is_ref_name, journal_key, journal_version, latest_key, parse_jid,
)
from cafs.format.location import Location, decode_stored, plain_view
from cafs.format.nodes import Entry
from cafs.format.pack import KIND_META, TAIL_LEN, decode_trailer, pack_key, trailer_length, trailer_of
from cafs.ids import digest
from cafs.sources import DEFAULT_DEADLINE, RetryingStore, Sources
from cafs.stores import LocalStore, ObjectExists, ResidentReads, Store, StreamingWrites, TrioReads, open_store

CONFIG_KEY = "config"
RELOCATION_RELOAD = 10.0
INDEX_READERS = 16  # index objects load_index reads at once from a remote store
TAKEN_UNLISTED = 10  # commit attempts a jid may be found taken but not listed before commit gives up
TRIO_TIMEOUT = 5.0  # seconds a read on the trio loop may take before the ordinary path has it

T = TypeVar("T")


@dataclass
class ObjectIndex:
    """Where every stored object lives: id -> location, plus the packs seen."""

    objects: dict[bytes, Location] = field(default_factory=dict)
    packs: dict[bytes, PackSummary] = field(default_factory=dict)

    def add(self, summary: PackSummary) -> None:
        self.packs[summary.pack_id] = summary
        for loc in summary.entries:
            self.objects.setdefault(loc.id, loc)


def same_repository(config: RepoConfig, repo_id: str, what: str) -> None:
    """Raise OtherRepository, naming ``what`` (the store ``config`` came from), unless
    ``config`` is that of repository ``repo_id``."""
    if config.repo_id != repo_id:
        raise OtherRepository(f"{what} holds another repository (id {config.repo_id[:12]}, not {repo_id[:12]})")


class MirrorOf:
    """A mirror's store, read through only once its config names the repository it
    mirrors (the same repo id): a mirror of another repository would serve another
    dataset under the same ref names. Until then (and again after each failed check)
    every read first reads the config; a mismatch, or no config, is ``OtherRepository``,
    so ``Sources`` sets the mirror aside, says why, and reads on without it."""

    def __init__(self, inner: Store, repo_id: str) -> None:
        self.inner = inner
        self.url = inner.url
        self._repo_id = repo_id
        self._checked = False

    def check(self) -> None:
        """Raise OtherRepository unless the store holds repository ``repo_id`` (and
        another StoreError when it cannot be asked)."""
        if self._checked:
            return
        try:
            config = decode_config(self.inner.get(CONFIG_KEY), f"{self.url}/config")
        except ObjectNotFound:
            raise OtherRepository(f"mirror {self.url}: not a cafs repository (no config)") from None
        except RepositoryError as exc:
            raise OtherRepository(f"mirror {exc}") from None
        same_repository(config, self._repo_id, f"mirror {self.url}")
        self._checked = True  # a plain flag: two threads checking at once both read the config

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.check()
        return self.inner.get(key, offset, length)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        self.check()
        return self.inner.list(prefix)

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        self.inner.put(key, data, exclusive=exclusive)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class Repository:
    def __init__(self, store: Store, config: RepoConfig, *, mirrors: Sequence[Store] = (),
                 deadline: float = DEFAULT_DEADLINE) -> None:
        self.primary = store
        self._resident = store if isinstance(store, ResidentReads) else None
        # a fast path bounded well inside the deadline: after it declines, the sources
        # have the rest of the deadline (``read_run``'s ``give_up``) for the ordinary read
        self._trio_gets = store.trio_gets(min(TRIO_TIMEOUT, deadline / 4)) if isinstance(store, TrioReads) else None
        self.store = RetryingStore(store, deadline=deadline)
        self.mirrors = tuple(MirrorOf(m, config.repo_id) for m in mirrors)
        self.sources = Sources([store, *self.mirrors], deadline=deadline)
        self.config = config
        self._relocations: ObjectIndex | None = None
        self._relocations_loaded = 0.0
        self._relocations_lock = threading.Lock()
        self._reloaded_for: set[bytes] = set()  # missing packs the index was loaded again for

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def local_root(self) -> Path | None:
        """The directory of a repository on a local disk (that imports must not read and
        extractions must not write into), else None."""
        return self.primary.root if isinstance(self.primary, LocalStore) else None

    @property
    def pack_store(self) -> Store:
        """Where new packs are written: the primary store itself when it takes objects in
        pieces (a local disk: a pack streams out while it fills, and retrying a disk is
        no use), else the retrying store (which puts each pack whole)."""
        return self.primary if isinstance(self.primary, StreamingWrites) else self.store

    # -- life cycle ---------------------------------------------------------------

    @classmethod
    def init(cls, store: Store, chunker: ChunkerParams = ChunkerParams(),
             pack_size: int = 64 << 20, *, repo_id: str | None = None,
             version: int = FORMAT_VERSION, deadline: float = DEFAULT_DEADLINE) -> Repository:
        """Create a repository in an empty store. ``repo_id`` is random unless given, and
        ``version`` the newest format unless given (``cafs copy`` gives a new mirror its
        source's id and version, so that what reads one reads the other). ``deadline``
        bounds the store operations of the repository returned, as ``open``'s."""
        config = check_config(RepoConfig(repo_id=repo_id or os.urandom(32).hex(), chunker=chunker,
                                         pack_size=pack_size, version=version))
        try:
            existing = store.get(CONFIG_KEY)
        except ObjectNotFound:
            pass
        else:
            decode_config(existing, f"{store.url}/config")  # a web server's page for any path is not one
            raise RepositoryError(f"{store.url}: a repository exists there already")
        if any(True for _ in store.list("")):
            raise RepositoryError(f"{store.url}: not empty and not a repository; refusing to init there")
        try:
            store.put(CONFIG_KEY, encode_config(config), exclusive=True)
        except ObjectExists:
            raise RepositoryError(f"{store.url}: a repository exists there already") from None
        return cls(store, config, deadline=deadline)

    @classmethod
    def open(cls, store: Store, *, mirrors: Sequence[Store] = (),
             deadline: float = DEFAULT_DEADLINE) -> Repository:
        sources = Sources([store, *mirrors], deadline=deadline)
        try:
            config = sources.read(lambda s: decode_config(s.get(CONFIG_KEY), f"{s.url}/config"))
        except ObjectNotFound:
            raise RepositoryError(f"{store.url}: not a cafs repository (no config)") from None
        return cls(store, config, mirrors=mirrors, deadline=deadline)

    @classmethod
    def at(cls, url: str, *, mirrors: Sequence[str] = (), deadline: float = DEFAULT_DEADLINE) -> Repository:
        """``open`` the repository at ``url`` with mirrors at ``mirrors``, every store's
        requests bounded by ``deadline``."""
        return cls.open(open_store(url, deadline=deadline),
                        mirrors=[open_store(m, deadline=deadline) for m in mirrors], deadline=deadline)

    def get(self, key: str, offset: int = 0, length: int | None = None, *, missing_ends: bool = False) -> bytes:
        """An object's bytes from the first source that has them. ``missing_ends``:
        ``ObjectNotFound`` once the repository's own store lacks it and no mirror gives
        it at once (``Sources.read``), without waiting for a mirror that fails."""
        return self.sources.read(lambda s: s.get(key, offset, length), missing_ends=missing_ends)

    def keys(self, prefix: str) -> list[tuple[str, int]]:
        return self.sources.read(lambda s: list(s.list(prefix)))

    # -- objects ------------------------------------------------------------------

    def read_verified(self, loc: Location, *, give_up: float | None = None) -> tuple[bytes | memoryview, bytes]:
        """The stored and the plain bytes of ``loc``, verified against its id: from its
        pack or, if gc moved it, from where the index says the object lives now. A pack
        the repository's own store lacks is looked for in the index at once, not after a
        wait for a mirror that fails; only when the index has nothing is that mirror
        waited for (it may hold the pack: a mirror read first, another gc's leftovers)."""
        try:
            stored, plain = self.read_run([loc], give_up=give_up, missing_ends=True)[0]
        except ObjectNotFound:
            moved = self.relocated(loc)
            if moved is None:
                stored, plain = self.read_run([loc], give_up=give_up)[0]
                return stored, bytes(plain)
            try:
                stored, plain = self.read_run([moved], give_up=give_up)[0]
            except ObjectNotFound:
                # moved on again since the index was loaded (another gc): that index is stale
                again = self.relocated(loc, gone=moved.pack)
                if again is None or again.pack == moved.pack:
                    raise
                stored, plain = self.read_run([again], give_up=give_up)[0]
        return stored, bytes(plain)  # one object's plain bytes are bytes already: no copy

    def read_run(self, locs: Sequence[Location], *, give_up: float | None = None,
                 missing_ends: bool = False) -> list[tuple[bytes | memoryview, bytes | memoryview]]:
        """``read_verified`` of several objects of one pack in ascending offset order, in
        one ranged read from ``locs[0]`` to the end of ``locs[-1]`` (gaps included). With
        several, the stored bytes and a raw object's plain ones are views of that read.
        ``give_up``: when retries stop (``Sources.read``), if not a deadline from now.
        ``missing_ends``: ``ObjectNotFound`` once the repository's own store lacks the
        pack and no mirror gives it at once (``Sources.read``), for a caller that then
        looks for the objects by id (``read_verified``)."""
        key, start, length = _run_range(locs)

        def attempt(store: Store) -> list[tuple[bytes | memoryview, bytes | memoryview]]:
            data = store.get(key, start, length)
            if len(locs) == 1:
                return [(data, decode_stored(locs[0], data))]
            return _split_run(locs, start, data)
        return self.sources.read(attempt, give_up=give_up, missing_ends=missing_ends)

    def advise_run(self, locs: Sequence[Location]) -> None:
        """Hint that ``locs`` (one pack, ascending) will be read soon: a primary store on a
        local disk starts reading them into the page cache. Otherwise nothing."""
        if locs and self._resident is not None:
            self._resident.advise(*_run_range(locs))

    def read_run_resident(self, locs: Sequence[Location]) -> list[tuple[bytes | memoryview, bytes | memoryview]] | None:
        """``read_run`` if the primary store has the bytes without waiting for a disk
        (``ResidentReads``), so the call may be made where blocking is not allowed; None
        if not, or if anything fails (``read_run`` then meets the failure, with the
        sources' failover and its report)."""
        if not locs or self._resident is None:
            return None
        key, start, length = _run_range(locs)
        data = self._resident.get_resident(key, start, length)
        if data is None:
            return None
        try:
            return _split_run(locs, start, data)
        except (IntegrityError, FormatError):
            return None

    async def read_run_async(self, locs: Sequence[Location]) -> list[tuple[bytes | memoryview, bytes | memoryview]] | None:
        """``read_run`` on the trio loop, from a primary store that can answer there
        (``TrioReads``: plain HTTP); None if it cannot, declines, or sends bytes that do
        not verify (``read_run`` then meets the failure, with the sources' failover, retries
        and report)."""
        gets = self._trio_gets
        if not locs or gets is None:
            return None
        key, start, length = _run_range(locs)
        data = await gets.get(key, start, length)
        if data is None:
            return None
        try:
            return _split_run(locs, start, data)
        except (IntegrityError, FormatError):
            gets.failed()
            return None

    def relocated(self, loc: Location, *, gone: bytes | None = None) -> Location | None:
        """Where the object of ``loc`` lives now, if its pack is gone; else None. The index
        is loaded again if older than ``RELOCATION_RELOAD`` seconds, or if it still names
        pack ``gone`` (``loc``'s by default), which a read has just found missing: once per
        such pack, as a store may list a pack that it then does not give."""
        gone = loc.pack if gone is None else gone
        with self._relocations_lock:
            now = time.monotonic()
            index = self._relocations
            if index is None or now - self._relocations_loaded > RELOCATION_RELOAD:
                self._reloaded_for.clear()
                index = None
            elif gone in index.packs and gone not in self._reloaded_for:
                self._reloaded_for.add(gone)
                index = None
            if index is None:
                try:
                    index = self.load_index()
                except ListingUnavailable:
                    index = ObjectIndex()  # nothing to search without a listing
                self._relocations, self._relocations_loaded = index, now
            moved = index.objects.get(loc.id)
        if moved is None or moved.pack == loc.pack or moved.length != loc.length:
            return None
        return moved  # perhaps in another form (codec, stored length): the read verifies it by id

    def read_object(self, loc: Location) -> bytes:
        """The plain bytes of a chunk or node, verified against its id."""
        return self.read_verified(loc)[1]

    def read_nodes_of(self, pack_id: bytes) -> list[tuple[Location, bytes]]:
        """Every node of metadata pack ``pack_id``, from one read of the whole pack: the
        location and plain bytes of each that verifies against its id (one that does not
        is left out; a read of it alone meets and reports it). Nothing for a data pack.
        Raises as ``get`` (``ObjectNotFound`` for a pack gc has removed from the
        repository's own store, though a mirror that fails may hold it), and FormatError
        for bytes that are not a pack."""
        what = f"pack {pack_id.hex()}"
        whole = memoryview(self.get(pack_key(pack_id), missing_ends=True))  # missing: moved, read alone by id
        trailer = trailer_of(whole, pack_id, what)
        if trailer.kind != KIND_META:
            return []
        nodes = []
        for loc in trailer.entries:
            try:
                nodes.append((loc, decode_stored(loc, whole[loc.offset:loc.end])))
            except IntegrityError:
                continue
        return nodes

    def read_pack(self, pack_id: bytes, check: Callable[[bytes], T]) -> T:
        """``check(the whole pack)``, read from the repository's own store (never a
        mirror: what is checked is this repository). Bytes that ``check`` finds damaged
        (it raises ``IntegrityError`` or ``FormatError``) are read again, as every verified
        read is (``RetryingStore.read``): a byte flipped on the way heals, damage in the
        store does not."""
        return self.store.read(lambda s: check(s.get(pack_key(pack_id))))

    def read_trailer(self, pack_id: bytes, length: int) -> PackSummary:
        key = pack_key(pack_id)
        what = f"pack {pack_id.hex()}"
        if length < TAIL_LEN:
            raise FormatError(f"{what}: {length} bytes is too short to be a pack")
        n = trailer_length(self.get(key, length - TAIL_LEN, TAIL_LEN), what)
        if n > length - TAIL_LEN:
            raise FormatError(f"{what}: trailer length {n} exceeds the pack")
        trailer = decode_trailer(self.get(key, length - TAIL_LEN - n, n), pack_id, length, what)
        return PackSummary(pack_id, length, trailer.kind, trailer.entries)

    def list_packs(self) -> dict[bytes, int]:
        packs = {}
        for key, size in self.keys("packs/"):
            name = key.rsplit("/", 1)[-1]
            try:
                packs[bytes.fromhex(name)] = size
            except ValueError:
                continue
        return {k: v for k, v in packs.items() if len(k) == 32}

    def load_index(self, *, on_problem: Callable[[str], None] | None = None) -> ObjectIndex:
        """Every object the repository holds: from index objects, then from the
        trailers of packs no index covers (left by an interrupted import)."""
        index = ObjectIndex()
        present = self.list_packs()
        keys = [key for key, _size in self.keys("index/")]
        for got in self._index_objects(keys):  # in listing order: the first read names an object's location
            if isinstance(got, CafsError):
                if on_problem:
                    on_problem(f"{got}; reading pack trailers instead")
                continue
            for summary in got:
                if summary.pack_id in present:
                    index.add(summary)
        for pack_id, size in present.items():
            if pack_id not in index.packs:
                try:
                    index.add(self.read_trailer(pack_id, size))
                except (FormatError, StoreError) as exc:
                    if on_problem:
                        on_problem(f"skipping unreadable pack: {exc}")
        return index

    def _index_objects(self, keys: list[str]) -> Iterator[list[PackSummary] | CafsError]:
        """``_index_object`` of each key, in order. There is one object per import until gc
        merges them, so from a remote store several are read at a time: one by one, each
        would cost the store's first-byte latency. A local disk has none to hide."""
        if self._resident is not None or len(keys) < 2:
            yield from map(self._index_object, keys)
            return
        with ThreadPoolExecutor(max_workers=min(INDEX_READERS, len(keys))) as pool:
            yield from pool.map(self._index_object, keys)

    def _index_object(self, key: str) -> list[PackSummary] | CafsError:
        """The packs an index object describes, verified, or why it cannot be read."""
        try:
            data = self.get(key)
            if digest(data).hex() != key.rsplit("/", 1)[-1]:
                raise IntegrityError(f"index object {key} does not match its name")
            return decode_index(data, key)
        except (FormatError, IntegrityError, StoreError) as exc:
            return exc

    def write_index(self, packs: list[PackSummary]) -> str | None:
        """Write an index object covering ``packs``; returns its key (None if no packs)."""
        if not packs:
            return None
        data = encode_index(packs)
        key = f"index/{digest(data).hex()}"
        self.store.put(key, data)
        return key

    def replace_indexes(self, packs: list[PackSummary]) -> None:
        """Write one index object covering exactly ``packs``, then delete every other
        one: after a rewrite of packs, no index names a pack about to go."""
        old = [key for key, _ in self.store.list("index/")]
        new = self.write_index(packs)
        for key in old:
            if key != new:
                self.store.delete(key)

    def delete_pack(self, pack_id: bytes) -> None:
        self.store.delete(pack_key(pack_id))

    # -- refs ---------------------------------------------------------------------

    def ref_names(self) -> list[str]:
        """The refs with at least one journal entry. A directory under ``refs/`` whose
        name no ref may have (put there by hand or by another tool) is not one: cafs never
        wrote it, and counting it would make every listing of the repository fail."""
        names = set()
        for key, _ in self.keys("refs/"):
            parts = key.split("/")
            if len(parts) == 3 and parse_jid(parts[2]) is not None and is_ref_name(parts[1]):
                names.add(parts[1])
        return sorted(names)

    def jids(self, name: str) -> list[int]:
        """Every jid of ``name``, ascending, from a listing of its entries (a listing that
        shows none: the ``latest`` pointer and the entries after it). Raises
        ``ListingUnavailable`` from a store that cannot list keys: there only the newest
        entries can be found (``newest_jids``), and an answer without the older ones
        would say they are gone (``snapshots``, ``forget``)."""
        return self._listed_jids(name) or self.jids_after_latest(name)

    def newest_jids(self, name: str) -> list[int]:
        """The jids of ``name`` a reader can find, ascending: every one, or from a store
        that cannot list keys the newest ones only (``jids_after_latest``). Enough to
        name a ref's newest snapshot, or the jid after it; not a whole journal."""
        try:
            listed = self._listed_jids(name)
        except ListingUnavailable:
            listed = []
        return listed or self.jids_after_latest(name)

    def _listed_jids(self, name: str) -> list[int]:
        check_ref_name(name)
        jids = []
        for key, _ in self.keys(f"refs/{name}/"):
            jid = parse_jid(key.rsplit("/", 1)[-1])
            if jid is not None:
                jids.append(jid)
        return sorted(jids)

    def jids_after_latest(self, name: str) -> list[int]:
        """The jids of ``name`` as a reader that cannot list keys finds them: the one
        ``refs/NAME/latest`` names and those right after it, as long as they exist."""
        try:
            jid = decode_latest(self.get(latest_key(name)))
        except ObjectNotFound:
            return []
        if jid is None:
            return []
        found = []
        # a pointer may lag behind commits; where the journal ends the repository's own
        # store says (a mirror is never ahead of it), not a mirror that is down
        while _exists(functools.partial(self.get, missing_ends=True), journal_key(name, jid)):
            found.append(jid)
            jid += 1
        return found

    def note_latest(self, name: str, jid: int) -> None:
        """Advance ``refs/NAME/latest`` to ``jid`` (advisory: a failure only costs
        readers of stores without listings the newest snapshots, until the next commit)."""
        try:
            try:
                current = decode_latest(self.store.get(latest_key(name)))
            except ObjectNotFound:
                current = None
            if current is None or current < jid:
                self.store.put(latest_key(name), encode_latest(jid))
        except StoreError:
            pass

    def snapshot(self, name: str, jid: int | None = None) -> Snapshot:
        check_ref_name(name)
        if jid is None:
            jids = self.newest_jids(name)
            if not jids:
                raise RefError(f"{self.url}: no ref named {name!r}")
            jid = jids[-1]
        try:
            data = self.get(journal_key(name, jid))
        except ObjectNotFound:
            raise RefError(f"{self.url}: ref {name!r} has no snapshot {jid}") from None
        return decode_snapshot(data, name, jid)

    def snapshots(self, name: str | None = None) -> list[Snapshot]:
        names = [name] if name else self.ref_names()
        return [self.snapshot(n, j) for n in names for j in self.jids(n)]

    def readable_snapshots(self, name: str | None = None) -> tuple[list[Snapshot], list[str]]:
        """The snapshots (of every ref, or of ``name``) whose journal entries decode, and
        a description of each that does not: one damaged entry hides no other."""
        names = [name] if name else self.ref_names()
        snaps, damaged = [], []
        for n in names:
            for j in self.jids(n):
                try:
                    snaps.append(self.snapshot(n, j))
                except (FormatError, IntegrityError, RefError) as exc:
                    damaged.append(str(exc))
        return snaps, damaged

    def commit(self, name: str, root: Entry, *, source: bytes, stats: dict[str, int]) -> Snapshot:
        """Record a new snapshot of ``name``: the single commit point of an import."""
        check_ref_name(name)
        taken: dict[int, int] = {}  # jid -> times its put found it taken
        for _attempt in range(100):
            jids = self.newest_jids(name)
            snap = Snapshot(ref=name, jid=(jids[-1] + 1) if jids else 1, time_ns=time.time_ns(),
                            root=root, host=os.uname().nodename[:255], source=source[:4096], stats=stats)
            key, data = journal_key(name, snap.jid), encode_snapshot(snap, journal_version(self.config.version))
            if taken.get(snap.jid, 0) >= TAKEN_UNLISTED:
                # taken, yet never listed: no concurrent import did that (a listing that
                # lags behind a put catches up within these tries); trying on would not help
                raise RefError(f"{self.url}: cannot commit {name}@{snap.jid}: something is at {key}, but the "
                               f"listing of refs/{name}/ does not show it (not a file?); move it away")
            try:
                self.store.put(key, data, exclusive=True)
            except ObjectExists:
                if not self._holds(key, data):
                    taken[snap.jid] = taken.get(snap.jid, 0) + 1
                    continue  # a concurrent import took that jid; take the next
                # else our own entry: a retried put whose first answer was lost
            self.note_latest(name, snap.jid)
            return snap
        raise RefError(f"{self.url}: could not commit ref {name!r}: too many concurrent writers")

    def _holds(self, key: str, data: bytes) -> bool:
        """Whether the object ``key`` is exactly ``data`` (an entry holds its time to the
        nanosecond and its host, so no other writer's entry has the same bytes)."""
        try:
            return self.store.get(key) == data
        except CafsError:
            return False


def _run_range(locs: Sequence[Location]) -> tuple[str, int, int]:
    """The pack key, offset and length of the one ranged read that covers ``locs`` (one
    pack, ascending), gaps included."""
    start = locs[0].offset
    return pack_key(locs[0].pack), start, locs[-1].offset + locs[-1].stored_length - start


def _split_run(locs: Sequence[Location], start: int,
               data: bytes | bytearray | memoryview) -> list[tuple[bytes | memoryview, bytes | memoryview]]:
    """The stored and the verified plain bytes of each of ``locs`` in ``data``, the read
    of their run from ``start``: views of it (a raw object's plain bytes too, hashed in
    place). Raises IntegrityError or FormatError for bytes that fail verification."""
    whole = memoryview(data)
    out: list[tuple[bytes | memoryview, bytes | memoryview]] = []
    for loc in locs:
        stored = whole[loc.offset - start:loc.offset - start + loc.stored_length]
        out.append((stored, plain_view(loc, stored)))
    return out


def _exists(get: Callable[[str, int, int], bytes], key: str) -> bool:
    try:
        get(key, 0, 0)
        return True
    except ObjectNotFound:
        return False


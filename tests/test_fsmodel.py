"""The filesystem model (``SnapshotFS``) called in-process, without a kernel.

Built as ``cafs.mountd.build_fs`` builds it (a ``NodeReader`` over a ``MetaCache``, a
``Fetcher`` over a ``ChunkCache`` in a temporary directory), over a repository imported
from a ``make_tree`` tree; the source tree is the oracle.
"""

from __future__ import annotations

import gc
import json
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import blake3
import pytest
import trio
from mountfix import import_tree, make_repo
from pagecache import evict_settled, resident_bytes, skip_unless_nowait_reads
from storewrap import PassThroughStore
from treegen import make_tree, manifest

from cafs.chunkcache import ChunkCache
from cafs.errors import FormatError, PathNotFound
from cafs.fetch import INLINE_BYTES, Fetcher, runs
from cafs.format.location import CODEC_ZSTD, Location
from cafs.format.journal import Snapshot
from cafs.format.nodes import KIND_DIR, KIND_FILE, DirIndexNode, Entry, Node, PageRef, TreeNode
from cafs.format.pack import pack_key
from cafs.fsmodel import (AHEAD_CHUNK_MIN, DIR_SIZE, NAME_MAX, ROOT_INO, IsADirectory, NameTooLong,
                          NotADirectory, SnapshotFS)
from cafs import metacache
from cafs.metacache import MetaCache, NodeReader
from cafs.naming import find_snapshot
from cafs.repository import Repository
from cafs.stores import Store, open_store
from cafs.tree import file_spans, list_dir, lookup, walk

BIG = (2 << 20) + 4321
WIDE = 3000  # three directory pages of 1024 entries


@dataclass
class Imported:
    src: Path
    repo: Path


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    base = tmp_path_factory.mktemp("model")
    src = make_tree(base / "src", seed=3, big_file_size=BIG, wide_dir_files=WIDE)
    repo = make_repo(base / "repo", base / "import-cache")
    import_tree(src, repo, "snap", base / "import-cache")
    return Imported(src, repo)


@pytest.fixture
def fs(imported: Imported, tmp_path: Path) -> Iterator[SnapshotFS]:
    """A model as the mount daemon builds one, with an empty cache of its own."""
    repo = Repository.open(open_store(str(imported.repo)))
    snapshot = find_snapshot(repo, "snap")
    root = tmp_path / "cache" / repo.config.repo_id
    meta = MetaCache(root)
    cache = ChunkCache(root, meta.env, 64 << 20)
    try:
        yield SnapshotFS(snapshot, NodeReader(repo, meta, defer_writes=True), Fetcher(repo, cache),
                         readahead=1 << 20)
    finally:
        cache.close()
        meta.close()


def resolve(fs: SnapshotFS, rel: bytes) -> int:
    ino = ROOT_INO
    for part in rel.split(b"/"):
        ino = fs.lookup(ino, part)[0]
    return ino


# -- lookup and attributes ------------------------------------------------------------------


def test_root(fs: SnapshotFS, imported: Imported) -> None:
    a = fs.attributes(ROOT_INO)
    st = os.lstat(imported.src)
    assert a.ino == ROOT_INO
    assert a.mode == st.st_mode
    assert a.size == DIR_SIZE
    assert a.mtime_ns == st.st_mtime_ns
    subdirs = sum(1 for p in imported.src.iterdir() if p.is_dir() and not p.is_symlink())
    assert a.nlink == 2 + subdirs


def test_lookup_and_attributes_match_the_source(fs: SnapshotFS, imported: Imported) -> None:
    src = os.fsencode(imported.src)
    for rel, item in manifest(imported.src).items():
        st = os.lstat(src + b"/" + rel)
        ino = resolve(fs, rel)
        a = fs.attributes(ino)
        assert (a.ino, a.mode, a.uid, a.gid, a.mtime_ns, a.blocks) == \
            (ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_blocks), rel
        if item.kind == "f":
            assert (a.size, a.nlink) == (st.st_size, st.st_nlink), rel
        elif item.kind == "l":
            assert fs.readlink(ino) == item.target, rel
            assert a.size == len(item.target or b""), rel
        else:
            assert a.size == DIR_SIZE, rel


def test_unknown_names_and_inodes_raise_path_not_found(fs: SnapshotFS) -> None:
    data = resolve(fs, b"data")
    for parent, name in ((ROOT_INO, b"nope"), (data, b"bigger"), (data, b"bi"), (data, b"\xff"),
                         (resolve(fs, b"empty"), b"x"), (resolve(fs, b"wide"), b"f999999"),
                         (resolve(fs, b"wide"), b"a")):
        with pytest.raises(PathNotFound):
            fs.lookup(parent, name)
    for ino in (0, 10**9):
        with pytest.raises(PathNotFound):
            fs.entry(ino)
        with pytest.raises(PathNotFound):
            fs.attributes(ino)


def test_a_name_longer_than_name_max_is_too_long_not_missing(fs: SnapshotFS) -> None:
    odd = resolve(fs, b"odd")
    assert fs.lookup(odd, b"x" * NAME_MAX)[1].name == b"x" * NAME_MAX
    with pytest.raises(NameTooLong):
        fs.lookup(odd, b"x" * (NAME_MAX + 1))


def test_wrong_kinds_raise(fs: SnapshotFS) -> None:
    big = resolve(fs, b"data/big")
    with pytest.raises(NotADirectory):
        fs.lookup(big, b"x")
    with pytest.raises(NotADirectory):
        list(fs.listdir(big, 0))
    with pytest.raises(IsADirectory):
        fs.open(resolve(fs, b"data"))
    with pytest.raises(PathNotFound):
        fs.open(resolve(fs, b"links/relative"))  # a symlink is not opened (the kernel follows it)
    with pytest.raises(PathNotFound):
        fs.readlink(big)


def test_inode_numbers_are_stable(fs: SnapshotFS, imported: Imported) -> None:
    rels = [rel for rel in manifest(imported.src)]
    first = {rel: resolve(fs, rel) for rel in rels}
    linked = {b"dups/copy0", b"dups/hardlink"}  # one file of two names
    assert first[b"dups/copy0"] == first[b"dups/hardlink"]
    assert len(set(first.values())) == len(first) - 1
    for ino in [ROOT_INO, *first.values()]:  # visit every directory's listing in between
        if fs.entry(ino).is_dir:
            list(fs.listdir(ino, 0))
    assert {rel: resolve(fs, rel) for rel in reversed(rels)} == first
    for rel, ino in first.items():
        if rel not in linked:
            assert fs.entry(ino).name == rel.rpartition(b"/")[2]


def test_hard_links_share_an_inode_whichever_name_is_met_first(fs: SnapshotFS) -> None:
    dups = resolve(fs, b"dups")
    listed = {e.name: ino for ino, e, _next in fs.listdir(dups, 0)}  # the listing meets copy0 first
    assert listed[b"hardlink"] == listed[b"copy0"] == fs.lookup(dups, b"hardlink")[0]
    assert len({listed[b"copy0"], listed[b"copy1"], listed[b"copy2"], listed[b"copy3"]}) == 4
    attrs = fs.attributes(listed[b"hardlink"])
    assert (attrs.ino, attrs.nlink) == (listed[b"copy0"], 2)


# -- listings -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", [b"", b"data", b"empty", b"odd", b"wide"])
def test_listdir_lists_names_in_order_with_their_inodes(fs: SnapshotFS, imported: Imported,
                                                      rel: bytes) -> None:
    ino = resolve(fs, rel) if rel else ROOT_INO
    listing = list(fs.listdir(ino, 0))
    names = [e.name for _ino, e, _next in listing]
    assert names == [b".", b".."] + sorted(os.listdir(os.fsencode(imported.src / os.fsdecode(rel))))
    assert [n for _ino, _e, n in listing] == list(range(1, len(listing) + 1))
    parent = resolve(fs, rel.rpartition(b"/")[0]) if b"/" in rel else ROOT_INO
    assert [i for i, _e, _n in listing[:2]] == [ino, parent]
    assert listing[0][1]._replace(name=fs.entry(ino).name) == fs.entry(ino)
    for child, e, _next in listing[2:]:
        assert fs.lookup(ino, e.name)[0] == child


@pytest.mark.parametrize("start", [0, 1, 2, 3, 1023, 1024, 1025, 1026, 2047, 2048, 2999, WIDE + 1, WIDE + 2, WIDE + 5])
def test_listdir_resumes_at_any_offset(fs: SnapshotFS, start: int) -> None:
    wide = resolve(fs, b"wide")
    everything = list(fs.listdir(wide, 0))
    assert len(everything) == WIDE + 2
    assert list(fs.listdir(wide, start)) == everything[start:]


def test_listdir_interleaved_listings(fs: SnapshotFS) -> None:
    wide = resolve(fs, b"wide")
    a, b = fs.listdir(wide, 2), fs.listdir(wide, 1502)
    seen_a, seen_b = [], []
    for _ in range(1500):
        seen_a.append(next(a)[1].name)
        seen_b.append(next(b)[1].name)
    seen_a += [e.name for _i, e, _n in a]
    assert seen_a == [b"f%06d" % i for i in range(1, WIDE + 1)]
    assert seen_b == seen_a[1500:]


class _CountedField:
    """A stand-in for a slot of ``PageRef`` that counts its reads."""

    def __init__(self, slot: Any) -> None:
        self.slot = slot
        self.reads = 0

    def __get__(self, obj: object, owner: type | None = None) -> Any:
        if obj is None:
            return self
        self.reads += 1
        return self.slot.__get__(obj, owner)

    def __set__(self, obj: object, value: object) -> None:
        self.slot.__set__(obj, value)


def test_listing_and_looking_up_a_paged_directory_take_each_page_once(fs: SnapshotFS,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A pass over the pages of the index for each entry made listing a directory of n
    # entries n * n / 2048 steps (the 200,000 names of one directory: 20 million).
    wide = resolve(fs, b"wide")
    list(fs.listdir(wide, 0))  # the index and its pages decoded, and cached
    counts = _CountedField(PageRef.__dict__["count"])
    firsts = _CountedField(PageRef.__dict__["first_name"])
    monkeypatch.setattr(PageRef, "count", counts)
    monkeypatch.setattr(PageRef, "first_name", firsts)
    pages = -(-WIDE // 1024)
    assert len(list(fs.listdir(wide, 0))) == WIDE + 2
    assert len(list(fs.listdir(wide, WIDE - 10))) == 12
    assert counts.reads <= 2 * pages  # each page's count read once per listing
    counts.reads = 0
    inodes = [fs.lookup(wide, b"f%06d" % i)[0] for i in range(1, WIDE + 1)]
    # a lookup bisects (the index was decoded before) and reads the count of its page
    assert firsts.reads == 0 and counts.reads <= WIDE
    counts.reads = 0
    assert [fs.entry(ino).name for ino in inodes] == [b"f%06d" % i for i in range(1, WIDE + 1)]
    assert counts.reads <= WIDE  # the count of the one page an entry is in


def _held(root: object, kind: type) -> int:
    """How many objects of ``kind`` are reachable from ``root``."""
    seen, todo, n = {id(root)}, [root], 0
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if id(ref) not in seen and not isinstance(ref, (type, ModuleType, FunctionType)):
                seen.add(id(ref))
                todo.append(ref)
                n += isinstance(ref, kind)
    return n


def test_decoded_nodes_are_bounded_by_the_entries_they_hold(imported: Imported, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader kept the last 4096 nodes decoded, whatever they held: directory pages
    # of 1024 entries (some 600 KB decoded) and file nodes of up to a million spans, so
    # a mount walking a large dataset grew to gigabytes.
    monkeypatch.setattr(metacache, "DECODED_ITEMS", 2000, raising=False)
    repo = Repository.open(open_store(str(imported.repo)))
    meta = MetaCache(tmp_path / "cache")
    try:
        reader = NodeReader(repo, meta)
        root = find_snapshot(repo, "snap").root
        wide = lookup(reader, root, b"wide")
        assert wide is not None
        assert len(list(list_dir(reader, wide))) == WIDE
        assert len([e for _p, e in walk(reader, root)]) > WIDE
        assert _held(reader, Entry) <= 2000
        assert lookup(reader, wide, b"f%06d" % WIDE) is not None  # read again when needed
    finally:
        meta.close()


class _Nodes:
    """A reader over nodes made in the test, by id: what a hostile writer may commit."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Node] = {}

    def add(self, node: Node) -> Location:
        loc = Location(bytes([len(self.nodes) + 1]) * 32, b"p" * 32, 0, 1, 1, 0)
        self.nodes[loc.id] = node
        return loc

    def node(self, loc: Location) -> Node:
        return self.nodes[loc.id]


def _dir(name: bytes, size: int, ref: Location) -> Entry:
    return Entry(name, KIND_DIR, 0o755, 0, 0, 0, size, 2, 0, ref=ref)


def _file(name: bytes, length: int) -> Entry:
    return Entry(name, KIND_FILE, 0o644, 0, 0, 0, length, 1, 0, spans=())


def test_a_directory_holding_more_entries_than_its_size_is_an_error_not_another_file() -> None:
    # A directory's inode numbers are a block of its size; an entry beyond it got the
    # number of an entry of the next directory's block, whose attributes (and bytes) a
    # stat (and read) of it then served.
    nodes = _Nodes()
    a = nodes.add(TreeNode((_file(b"x", 1), _file(b"y", 2))))
    b = nodes.add(TreeNode((_file(b"p", 3), _file(b"q", 4))))
    root = nodes.add(TreeNode((_dir(b"a", 1, a), _dir(b"b", 2, b))))  # a says it holds one entry
    snap = Snapshot("ds", 1, 0, Entry(b"", KIND_DIR, 0o755, 0, 0, 0, 2, 4, 0, ref=root))
    fs = SnapshotFS(snap, nodes, None)  # type: ignore[arg-type]  # no read: no fetcher
    ino_a, ino_b = fs.lookup(ROOT_INO, b"a")[0], fs.lookup(ROOT_INO, b"b")[0]
    assert fs.attributes(fs.lookup(ino_a, b"x")[0]).size == 1
    with pytest.raises(FormatError, match="holds more entries"):
        fs.lookup(ino_a, b"y")
    assert fs.attributes(fs.lookup(ino_b, b"p")[0]).size == 3
    with pytest.raises(FormatError, match="holds more entries"):
        list(fs.listdir(ino_a, 0))


def test_a_page_holding_more_entries_than_its_count_is_an_error() -> None:
    nodes = _Nodes()
    first = nodes.add(TreeNode((_file(b"a", 1), _file(b"b", 2))))  # the index says 1
    second = nodes.add(TreeNode((_file(b"c", 3),)))
    big = nodes.add(DirIndexNode((PageRef(b"a", 1, first), PageRef(b"c", 1, second))))
    root = nodes.add(TreeNode((_dir(b"d", 2, big),)))
    snap = Snapshot("ds", 1, 0, Entry(b"", KIND_DIR, 0o755, 0, 0, 0, 1, 3, 0, ref=root))
    fs = SnapshotFS(snap, nodes, None)  # type: ignore[arg-type]
    d = fs.lookup(ROOT_INO, b"d")[0]
    assert fs.attributes(fs.lookup(d, b"c")[0]).size == 3
    with pytest.raises(FormatError, match="more entries than the 1 its index says"):
        fs.lookup(d, b"b")  # it would have been given c's inode number


# -- reads ----------------------------------------------------------------------------------


def _starts(spans: tuple[Location, ...]) -> list[int]:
    """The plain offset where each span starts, and the file's size last."""
    starts = [0]
    for s in spans:
        starts.append(starts[-1] + s.length)
    return starts


def _spans_starts(fs: SnapshotFS, ino: int) -> list[int]:
    return _starts(file_spans(fs.reader, fs.entry(ino)))


async def test_read_ranges(fs: SnapshotFS, imported: Imported) -> None:
    data = (imported.src / "data/big").read_bytes()
    ino = resolve(fs, b"data/big")
    starts = _spans_starts(fs, ino)
    assert len(starts) > 10
    fh = fs.open(ino)
    try:
        ranges = [(0, len(data)), (0, 1), (len(data) - 1, 10), (len(data), 10), (len(data) + 99, 1),
                  (0, 0), (12345, 0)]
        for b in starts[1:-1]:
            ranges += [(b - 1, 2), (b, 1), (b - 1000, 200_000), (b - 70_000, 140_001)]
        nonempty = 0
        for off, size in ranges:
            off = max(0, off)
            want = data[off:off + size]
            assert bytes(await fs.read(fh, off, size)) == want, (off, size)
            nonempty += bool(want)
    finally:
        fs.release(fh)
    assert (fs.counters.opens, fs.counters.reads) == (1, nonempty)  # empty reads are not counted


async def test_sequential_reads_with_readahead_fetch_each_chunk_once(fs: SnapshotFS,
                                                                    imported: Imported) -> None:
    data = (imported.src / "data/big").read_bytes()
    ino = resolve(fs, b"data/big")
    spans = file_spans(fs.reader, fs.entry(ino))
    async with fs.fetcher.running():
        fh = fs.open(ino)
        pieces, off = [], 0
        while piece := bytes(await fs.read(fh, off, 128 << 10)):
            pieces.append(piece)
            off += len(piece)
        fs.release(fh)
    assert b"".join(pieces) == data
    c = fs.fetcher.counters
    assert c.misses == len({(s.pack, s.offset) for s in spans})
    unique = {(s.pack, s.offset): s for s in spans}.values()
    assert c.bytes_fetched == sum(s.stored_length for s in unique)
    assert c.errors == c.in_flight == 0


def _big_file(fs: SnapshotFS) -> tuple[int, tuple[Location, ...], list[int]]:
    """data/big's inode, its spans, and their starts (``_starts``)."""
    ino = resolve(fs, b"data/big")
    spans = file_spans(fs.reader, fs.entry(ino))
    return ino, spans, _starts(spans)


def _chunks_over(spans: tuple[Location, ...], starts: list[int], lo: int, hi: int) -> set[tuple[bytes, int]]:
    """The chunks (pack, offset) that hold any byte of ``[lo, hi)``."""
    return {(s.pack, s.offset) for s, a, b in zip(spans, starts, starts[1:]) if a < hi and b > lo}


async def test_a_reader_that_jumps_back_loads_one_window_not_the_rest_of_the_file(
        fs: SnapshotFS, imported: Imported) -> None:
    # A sequential pass near the end of a file leaves its window there; a reader that then
    # reads the start of the file in order (a footer, then the body) starts a window of
    # its own, instead of loading everything up to the old window's end.
    fs.readahead = 256 << 10
    ino, spans, starts = _big_file(fs)
    size = starts[-1]
    async with fs.fetcher.running():
        fh = fs.open(ino)
        for off in (size - (32 << 10), size - (16 << 10)):  # the footer, in two reads
            await fs.read(fh, off, 16 << 10)
        loaded = await _settled(fs.fetcher)
        for off in (0, 16 << 10):  # the body, from its start
            await fs.read(fh, off, 16 << 10)
        fetched = await _settled(fs.fetcher) - loaded
        fs.release(fh)
    window = _chunks_over(spans, starts, 0, (32 << 10) + fs.readahead)
    assert len(spans) > 3 * len(window)
    assert fetched <= len(window)  # was every chunk of the file


async def test_random_reads_near_each_other_load_only_their_own_chunks(
        fs: SnapshotFS, imported: Imported) -> None:
    # Records read at random offsets of a file: each read is within the readahead of the
    # one before, but none continues another, so none loads a window ahead.
    fs.readahead = 512 << 10
    ino, spans, starts = _big_file(fs)
    data = (imported.src / "data/big").read_bytes()
    offsets = [1 << 20, (1 << 20) + (200 << 10), (1 << 20) - (300 << 10), (1 << 20) + (100 << 10)]
    async with fs.fetcher.running():
        fh = fs.open(ino)
        for off in offsets:
            assert bytes(await fs.read(fh, off, 4096)) == data[off:off + 4096]
        fetched = await _settled(fs.fetcher)
        fs.release(fh)
    needed = set().union(*(_chunks_over(spans, starts, off, off + 4096) for off in offsets))
    assert fetched == len(needed)  # was each near read's window too


class _RecordingStore(PassThroughStore):
    """Records the ranged reads of packs."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.pack_reads: list[tuple[str, int, int | None]] = []

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("packs/"):
            self.pack_reads.append((key, offset, length))
        return super().get(key, offset, length)


async def test_requests_needing_one_node_at_once_load_it_once(imported: Imported, tmp_path: Path) -> None:
    # A pool of readers starting in one directory: each lookup meets the same node not
    # loaded yet. One store read serves them all.
    store = _RecordingStore(open_store(str(imported.repo)))
    repo = Repository.open(store)
    root = tmp_path / "cache" / repo.config.repo_id
    meta = MetaCache(root)
    snapshot = find_snapshot(repo, "snap")
    fs = SnapshotFS(snapshot, NodeReader(repo, meta, defer_writes=True, defer_fetches=True), Fetcher(repo, None))
    node = snapshot.root.ref
    assert node is not None
    try:
        store.pack_reads.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(fs.load_node, node)
        assert fs.lookup(ROOT_INO, b"data")  # loaded: no NodeNotLoaded
    finally:
        meta.close()
    assert [r for r in store.pack_reads if r[0] == pack_key(node.pack)] == [
        (pack_key(node.pack), node.offset, node.stored_length)]


async def test_readahead_of_reads_arriving_out_of_order_asks_the_store_in_large_runs(
        imported: Imported, tmp_path: Path) -> None:
    # The kernel's readahead sends several reads of a file at once, and they reach the
    # daemon in any order: still a sequential pass, loaded in runs of half the readahead
    # or more, not one store request per chunk.
    store = _RecordingStore(open_store(str(imported.repo)))
    repo = Repository.open(store)
    root = tmp_path / "cache" / repo.config.repo_id
    meta = MetaCache(root)
    cache = ChunkCache(root, meta.env, 64 << 20)
    readahead = 1 << 20
    fs = SnapshotFS(find_snapshot(repo, "snap"), NodeReader(repo, meta, defer_writes=True), Fetcher(repo, cache),
                    readahead=readahead)
    try:
        data = (imported.src / "data/big").read_bytes()
        ino = resolve(fs, b"data/big")
        spans = file_spans(fs.reader, fs.entry(ino))
        got: dict[int, bytes] = {}

        in_flight = trio.Semaphore(16)

        async def read(off: int) -> None:
            async with in_flight:
                got[off] = bytes(await fs.read(fh, off, 16 << 10))

        store.pack_reads.clear()
        async with fs.fetcher.running():
            fh = fs.open(ino)
            async with trio.open_nursery() as nursery:  # up to 16 at once, pairs swapped
                for pair in range(0, len(data), 32 << 10):
                    for off in (pair + (16 << 10), pair):
                        nursery.start_soon(read, off)
                        await trio.sleep(0)
            fs.release(fh)
    finally:
        cache.close()
        meta.close()
    assert b"".join(got[off] for off in sorted(got)) == data
    assert fs.fetcher.counters.misses == len({(s.pack, s.offset) for s in spans})  # each chunk once
    packs = len({s.pack for s in spans})
    assert len(spans) > 4 * len(data) // readahead
    # a run per pack (each of these is under RUN_BYTES), one more where a top-up of the
    # readahead splits one; loading each chunk when its reader came made 6-8 here
    assert len(store.pack_reads) <= packs + 1


async def test_runs_are_written_to_the_cache_behind_their_readers(
        fs: SnapshotFS, imported: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    # A reader has its bytes while the cache is still being written, and every chunk is
    # cached once the fetcher stops.
    cache = fs.fetcher.cache
    assert cache is not None
    release, written = threading.Event(), []
    real_insert = cache.insert_batch

    def held_insert(batch: list[tuple[bytes, list[tuple[int, bytes]]]]) -> None:
        release.wait(30)
        real_insert(batch)
        written.append(len(batch))

    monkeypatch.setattr(cache, "insert_batch", held_insert)
    data = (imported.src / "data/big").read_bytes()
    ino = resolve(fs, b"data/big")
    try:
        async with fs.fetcher.running():
            fh = fs.open(ino)
            with trio.fail_after(20):
                assert bytes(await fs.read(fh, 0, len(data))) == data
            fs.release(fh)
            assert not written
            release.set()
    finally:
        release.set()
    spans = file_spans(fs.reader, fs.entry(ino))
    assert all(cache.cached((s.pack, s.offset, s.stored_length) for s in spans))
    assert fs.fetcher._writing == 0


async def test_a_chunk_the_lru_dropped_before_its_cache_write_is_not_fetched_again(
        imported: Imported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Random readers go through the in-memory LRU in a few dozen reads, faster than the
    # cache is written behind them: a chunk read again meanwhile comes from its fetched
    # bytes, verified again, not from the store a second time.
    store = _RecordingStore(open_store(str(imported.repo)))
    repo = Repository.open(store)
    root = tmp_path / "cache" / repo.config.repo_id
    meta = MetaCache(root)
    cache = ChunkCache(root, meta.env, 64 << 20)
    fetcher = Fetcher(repo, cache, memory_bytes=4)  # an LRU that keeps nothing
    fs = SnapshotFS(find_snapshot(repo, "snap"), NodeReader(repo, meta, defer_writes=True), fetcher,
                    readahead=0)
    release = threading.Event()
    real_insert = cache.insert_batch

    def held_insert(batch: list[tuple[bytes, list[tuple[int, bytes]]]]) -> None:
        release.wait(30)
        real_insert(batch)

    monkeypatch.setattr(cache, "insert_batch", held_insert)
    data = (imported.src / "data/big").read_bytes()
    try:
        fh = fs.open(resolve(fs, b"data/big"))
        store.pack_reads.clear()
        async with fetcher.running():
            try:
                with trio.fail_after(20):
                    for off in (300_000, 1_500_000, 300_000, 1_500_000):
                        assert bytes(await fs.read(fh, off, 4096)) == data[off:off + 4096]
            finally:
                release.set()  # the writes go on once the reads are done
        fs.release(fh)
        assert fetcher.counters.misses == len(store.pack_reads) == 2  # was 4: each chunk fetched again
        assert not fetcher._unwritten  # forgotten once written
    finally:
        release.set()
        cache.close()
        meta.close()


async def test_small_runs_are_written_to_the_cache_in_batches(
        fs: SnapshotFS, imported: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small files (and what readahead loads beside them) reach the cache in a few
    # batches, the last one by the timer while the fetcher still runs.
    cache = fs.fetcher.cache
    assert cache is not None
    batches: list[int] = []
    real_insert = cache.insert_batch

    def counted_insert(batch: list[tuple[bytes, list[tuple[int, bytes]]]]) -> None:
        batches.append(sum(len(extents) for _, extents in batch))
        real_insert(batch)

    monkeypatch.setattr(cache, "insert_batch", counted_insert)
    rels = sorted(rel for rel, item in manifest(imported.src).items()
                  if item.kind == "f" and rel.startswith(b"wide/"))[::7]
    spans = [loc for rel in rels for loc in _spans_of(fs, rel)]
    async with fs.fetcher.running():
        for rel in rels:
            fh = fs.open(resolve(fs, rel))
            assert bytes(await fs.read(fh, 0, 1 << 20)) == (imported.src / os.fsdecode(rel)).read_bytes()
            fs.release(fh)
        with trio.fail_after(10):
            while not all(cache.cached((s.pack, s.offset, s.stored_length) for s in spans)):
                await trio.sleep(0.01)
    assert sum(batches) >= len({(s.pack, s.offset) for s in spans})
    assert 0 < len(batches) < len(rels) // 4


async def test_small_runs_of_a_local_repository_load_on_the_loop_with_a_cache(
        fs: SnapshotFS, imported: Imported) -> None:
    # Resident in the repository's page cache and not in the chunk cache: read, verified
    # and answered on the trio thread, then written to the cache behind the reader.
    skip_unless_nowait_reads(imported.repo)
    for pack in _packs(imported.repo):
        pack.read_bytes()
    spans = {rel: _spans_of(fs, rel) for rel in SMALL}
    fetcher = fs.fetcher
    async with fetcher.running():
        for rel in SMALL:
            fh = fs.open(resolve(fs, rel))
            assert bytes(await fs.read(fh, 0, 1 << 20)) == (imported.src / os.fsdecode(rel)).read_bytes()
            fs.release(fh)
    chunks = sum(len(s) for s in spans.values())
    assert fetcher.counters.inline == fetcher.counters.misses == chunks
    assert fetcher.cache is not None
    assert all(fetcher.cache.cached((s.pack, s.offset, s.stored_length) for s in spans[rel]) for rel in SMALL)


async def test_concurrent_readers_share_each_load(fs: SnapshotFS, imported: Imported) -> None:
    rels = [b"data/big", b"data/half-dup", b"dups/copy0", b"dups/hardlink", b"data/copy-of-dups"]
    want = {rel: (imported.src / os.fsdecode(rel)).read_bytes() for rel in rels}
    got: dict[tuple[int, bytes], bytes] = {}

    async def reader(n: int, rel: bytes) -> None:
        fh = fs.open(resolve(fs, rel))
        pieces, off = [], 0
        while piece := bytes(await fs.read(fh, off, (n + 1) * 50_000)):
            pieces.append(piece)
            off += len(piece)
        fs.release(fh)
        got[n, rel] = b"".join(pieces)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            for rel in rels:
                nursery.start_soon(reader, n, rel)
    assert got == {(n, rel): want[rel] for n in range(4) for rel in rels}
    keys = set()
    for rel in rels:
        keys |= {(s.pack, s.offset) for s in file_spans(fs.reader, fs.entry(resolve(fs, rel)))}
    assert fs.fetcher.counters.misses == len(keys)


async def test_a_second_model_reads_from_the_cache(fs: SnapshotFS, imported: Imported) -> None:
    ino = resolve(fs, b"data/big")
    fh = fs.open(ino)
    await fs.read(fh, 0, BIG)
    fs.release(fh)
    assert fs.fetcher.cache is not None
    fs.fetcher.cache.flush_touches()
    again = SnapshotFS(fs.snapshot, fs.reader, Fetcher(fs.fetcher.repo, fs.fetcher.cache))
    fh = again.open(resolve(again, b"data/big"))
    assert bytes(await again.read(fh, 0, BIG)) == (imported.src / "data/big").read_bytes()
    assert again.fetcher.counters.misses == 0 and again.fetcher.counters.hits > 0


# -- reads the page cache can answer --------------------------------------------------------


@pytest.fixture
def in_place(imported: Imported, tmp_path: Path) -> Iterator[SnapshotFS]:
    """A model reading the repository in place, with no chunk cache, as a mount of a local
    repository does by default."""
    skip_unless_nowait_reads(imported.repo)
    repo = Repository.open(open_store(str(imported.repo)))
    meta = MetaCache(tmp_path / "cache" / repo.config.repo_id)
    try:
        yield SnapshotFS(find_snapshot(repo, "snap"), NodeReader(repo, meta, defer_writes=True),
                         Fetcher(repo, None), readahead=1 << 20)
    finally:
        meta.close()


def _packs(repo: Path) -> list[Path]:
    return [p for p in (repo / "packs").rglob("*") if p.is_file()]


def _spans_of(fs: SnapshotFS, rel: bytes) -> tuple[Location, ...]:
    return file_spans(fs.reader, fs.entry(resolve(fs, rel)))


SMALL = [b"data/f0016384", b"data/f0065543", b"data/text.txt", b"data/sub/s00"]


async def test_small_chunks_in_the_page_cache_load_on_the_loop(in_place: SnapshotFS,
                                                                 imported: Imported) -> None:
    fetcher = in_place.fetcher
    spans = {rel: _spans_of(in_place, rel) for rel in SMALL}
    locs = [loc for rel in SMALL for loc in spans[rel]]
    assert any(loc.codec == CODEC_ZSTD for loc in locs)
    for loc in locs:  # not resident: each goes to a worker thread
        # evicted before each: the kernel's readahead for one chunk's read may bring
        # in its neighbour, which would then rightly load on the loop
        evict_settled(_packs(imported.repo))
        await fetcher.chunk(loc)
    assert fetcher.counters.inline == 0 and fetcher.counters.misses == len(locs)
    again = Fetcher(fetcher.repo, None)
    for pack in _packs(imported.repo):
        pack.read_bytes()  # now the page cache holds every pack
    for rel in SMALL:
        got = b"".join([await again.chunk(loc) for loc in spans[rel]])
        assert got == (imported.src / os.fsdecode(rel)).read_bytes()
    assert again.counters.inline == again.counters.misses == len(locs)
    # a run of neighbours over INLINE_BYTES is a worker's, resident or not
    run = next(r for r in runs(_spans_of(in_place, b"data/big"))
               if r[-1].offset + r[-1].stored_length - r[0].offset > INLINE_BYTES)
    await again.load(run)
    assert again.counters.inline == len(locs) and again.counters.misses == len(locs) + len(run)


async def test_opening_a_file_starts_the_disk(in_place: SnapshotFS, imported: Imported) -> None:
    spans = _spans_of(in_place, b"data/f0065543")
    packs = {imported.repo / pack_key(loc.pack) for loc in spans}
    evict_settled(list(packs))
    fh = in_place.open(resolve(in_place, b"data/f0065543"))
    try:
        deadline = time.monotonic() + 10
        while sum(map(resident_bytes, packs)) < sum(loc.stored_length for loc in spans):
            assert time.monotonic() < deadline, "the open did not bring the chunks into the page cache"
            await trio.sleep(0.01)
        assert bytes(await in_place.read(fh, 0, 1 << 20)) == (imported.src / "data/f0065543").read_bytes()
    finally:
        in_place.release(fh)
    assert in_place.fetcher.counters.inline == len(spans)


async def _settled(fetcher: Fetcher) -> int:
    """The fetcher's misses once no load is in flight."""
    deadline = time.monotonic() + 10
    while fetcher.counters.in_flight:
        assert time.monotonic() < deadline, "loads still in flight after 10 s"
        await trio.sleep(0.01)
    return fetcher.counters.misses


async def test_opens_the_kernel_serves_itself_load_nothing_ahead(fs: SnapshotFS) -> None:
    fs.readahead = 9 * AHEAD_CHUNK_MIN  # nine of the wide directory's files ahead
    wide = resolve(fs, b"wide")
    files = [(ino, e) for ino, e, _ in fs.listdir(wide, 0) if e.is_file][:60]
    async with fs.fetcher.running():
        for ino, _ in files[:20]:  # opened in name order, never read: the kernel had them
            fs.release(fs.open(ino))
        loaded = await _settled(fs.fetcher)
        for ino, _ in files[20:30]:
            fs.release(fs.open(ino))
        assert await _settled(fs.fetcher) == loaded
        for ino, e in files[30:]:  # read in name order: loading ahead resumes
            fh = fs.open(ino)
            await fs.read(fh, 0, e.size)
            fs.release(fh)
        assert await _settled(fs.fetcher) > loaded + 30, "reads in name order no longer load ahead"


async def test_one_neighbour_opened_after_another_is_not_yet_an_order(fs: SnapshotFS) -> None:
    fs.readahead = 9 * AHEAD_CHUNK_MIN
    wide = resolve(fs, b"wide")
    files = [(ino, e) for ino, e, _ in fs.listdir(wide, 0) if e.is_file]

    async def read(k: int) -> int:
        ino, e = files[k]
        fh = fs.open(ino)
        await fs.read(fh, 0, e.size)
        fs.release(fh)
        return await _settled(fs.fetcher)

    async with fs.fetcher.running():
        for k in (500, 100, 900, 901):  # shuffled, and by chance 901 after 900
            assert await read(k) == [500, 100, 900, 901].index(k) + 1, "loaded ahead of a chance neighbour"
        assert await read(902) > 5, "three files in name order did not load ahead"


async def test_loading_ahead_in_a_directory_of_tiny_files_plans_what_the_lru_holds(
        fs: SnapshotFS, monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted by their bytes alone, the 1 MiB ahead was the whole wide directory (3,000
    # files of a few bytes) at once: in a mount, every chunk of a directory of tiny files
    # stayed in the fetcher's in-memory LRU (some 1 KB a file read), and bounded by a
    # number of chunks, that LRU dropped them before they were read.
    wide = resolve(fs, b"wide")
    files = [(ino, e) for ino, e, _ in fs.listdir(wide, 0) if e.is_file]
    planned: list[int] = []
    prefetch = fs.fetcher.prefetch

    def counted(locs: Iterable[Location]) -> None:
        locs = list(locs)
        planned.append(len(locs))
        prefetch(locs)

    monkeypatch.setattr(fs.fetcher, "prefetch", counted)
    async with fs.fetcher.running():
        for ino, e in files[:1000]:
            fh = fs.open(ino)
            await fs.read(fh, 0, e.size)
            fs.release(fh)
    assert max(planned) <= fs.readahead // AHEAD_CHUNK_MIN
    assert sum(planned) >= 1000, "reads in name order no longer load ahead"


# -- extended attributes --------------------------------------------------------------------


def test_xattrs_of_a_file(fs: SnapshotFS, imported: Imported) -> None:
    for rel in (b"data/f0000001", b"data/f0004096", b"data/sub/s00"):
        data = (imported.src / os.fsdecode(rel)).read_bytes()
        want = blake3.blake3(data).hexdigest().encode()
        assert fs.xattrs(resolve(fs, rel)) == {b"user.cafs.id": want}
    ids = {rel: fs.xattrs(resolve(fs, rel))[b"user.cafs.id"]
           for rel in (b"dups/copy0", b"dups/copy1", b"dups/hardlink", b"data/big",
                       b"data/half-dup")}
    assert ids[b"dups/copy0"] == ids[b"dups/copy1"] == ids[b"dups/hardlink"]
    assert len(set(ids.values())) == 3


def test_xattrs_of_directories_and_symlinks(fs: SnapshotFS) -> None:
    data, wide = resolve(fs, b"data"), resolve(fs, b"wide")
    ref = fs.entry(data).ref
    assert ref is not None
    assert fs.xattrs(data)[b"user.cafs.id"] == ref.id.hex().encode()
    assert fs.xattrs(wide)[b"user.cafs.id"] != fs.xattrs(data)[b"user.cafs.id"]
    link = resolve(fs, b"links/relative")
    assert fs.xattrs(link) == {}  # Linux lets no one read user.* names of a symlink


def test_xattrs_of_the_root(fs: SnapshotFS) -> None:
    x = fs.xattrs(ROOT_INO)
    assert set(x) == {b"user.cafs.id", b"user.cafs.snapshot", b"user.cafs.stats", b"user.cafs.pid"}
    assert x[b"user.cafs.id"] == fs.snapshot.root_id.hex().encode()
    assert x[b"user.cafs.snapshot"] == b"snap@1"
    assert int(x[b"user.cafs.pid"]) == os.getpid()
    stats = json.loads(x[b"user.cafs.stats"])
    assert stats["cache_limit"] == 64 << 20 and stats["bytes_read"] == 0


def test_statfs_totals(fs: SnapshotFS, imported: Imported) -> None:
    items = manifest(imported.src)
    total, entries = fs.statfs_totals()
    assert entries == len(items) + 1
    assert total == sum(i.size for i in items.values() if i.kind == "f")


def test_modes_keep_special_bits(fs: SnapshotFS) -> None:
    a = fs.attributes(resolve(fs, b"modes/setgid-dir"))
    assert stat.S_ISDIR(a.mode) and stat.S_IMODE(a.mode) == 0o2755

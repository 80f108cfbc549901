"""Sparse files: holes are cut into the chunks their zeros would give, without reading
them, so a sparse file and a dense copy are stored as the same chunks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings, strategies as st
from pyfastcdc import Chunk, FastCDC

from cafs.extract import Extractor
from cafs.format.config import ChunkerParams
from cafs.format.journal import Snapshot
from cafs.ids import digest
from cafs.importer import run_import
from cafs.metacache import MetaCache, NodeReader
from cafs.repository import Repository
from cafs.sparse import ZeroRun, cut, holes, zeros_cut_at_max
from cafs.stores.local import LocalStore
from cafs.tree import file_spans, resolve
from storewrap import PassThroughStore
from treegen import assert_same_tree

MIN, AVG, MAX = 1024, 4096, 16384  # small, so a file of a few hundred KiB has several holes
Islands = list[tuple[int, bytes]]


def write_sparse(path: Path, size: int, islands: Islands) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in islands:
            f.seek(offset)
            f.write(data[:max(0, size - offset)])


def dense_bytes(path: Path) -> bytes:
    return path.read_bytes()


def chunk_ids(items: Iterable[Chunk | ZeroRun], max_size: int) -> list[tuple[bytes, int]]:
    """Taken as the chunks come: a streamed chunk's bytes are only valid until the next."""
    out: list[tuple[bytes, int]] = []
    for item in items:
        if isinstance(item, ZeroRun):
            out += [(digest(bytes(max_size)), max_size)] * item.count
        else:
            out.append((digest(item.data), item.length))
    return out


def sparse_cut(path: Path, cdc: FastCDC, max_size: int) -> tuple[list[tuple[bytes, int]], int]:
    """The chunks ``cut`` gives for the file, and how many of them were skipped holes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        gaps = holes(fd, os.fstat(fd).st_size, 2 * max_size)
        ids: list[tuple[bytes, int]] = []
        skipped = 0
        for item in cut(cdc, fd, max_size, gaps):
            skipped += item.count if isinstance(item, ZeroRun) else 0
            ids += chunk_ids([item], max_size)
        return ids, skipped
    finally:
        os.close(fd)


def test_holes_are_the_ranges_never_written(tmp_path: Path) -> None:
    path = tmp_path / "f"
    write_sparse(path, 1 << 20, [(0, b"a" * 4096), (512 << 10, b"b" * 4096)])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert holes(fd, 1 << 20, 64 << 10) == [(4096, 512 << 10), ((512 << 10) + 4096, 1 << 20)]
        assert holes(fd, 1 << 20, 600 << 10) == []
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    finally:
        os.close(fd)


def test_zeros_are_cut_at_the_maximum_size_by_these_chunkers() -> None:
    default = ChunkerParams()
    assert zeros_cut_at_max(FastCDC(avg_size=default.avg_size, min_size=default.min_size,
                                    max_size=default.max_size), default.max_size)
    assert zeros_cut_at_max(FastCDC(avg_size=AVG, min_size=MIN, max_size=MAX), MAX)


islands = st.lists(st.tuples(st.integers(0, 400_000), st.integers(1, 40_000), st.integers(0, 255)),
                   max_size=6)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 420_000), spec=islands, seed=st.binary(min_size=8, max_size=8))
def test_a_sparse_file_is_cut_like_its_dense_bytes(size: int, spec: list[tuple[int, int, int]], seed: bytes) -> None:
    cdc = FastCDC(avg_size=AVG, min_size=MIN, max_size=MAX)
    parts: Islands = []
    for i, (offset, length, fill) in enumerate(spec):
        # random-looking bytes, some runs of one value, so cut points fall anywhere
        block = (digest(seed + bytes([i])) * (length // 32 + 1))[:length] if fill % 2 else bytes([fill]) * length
        parts.append((offset, block))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f"
        write_sparse(path, size, parts)
        got, _ = sparse_cut(path, cdc, MAX)
        assert got == chunk_ids(cdc.cut_buf(dense_bytes(path)), MAX)


def test_a_long_hole_is_skipped_not_read(tmp_path: Path) -> None:
    cdc = FastCDC(avg_size=AVG, min_size=MIN, max_size=MAX)
    path = tmp_path / "f"
    write_sparse(path, 1 << 20, [(1000, os.urandom(20_000)), (900_000, os.urandom(3000))])
    got, skipped = sparse_cut(path, cdc, MAX)
    assert got == chunk_ids(cdc.cut_buf(dense_bytes(path)), MAX)
    assert skipped >= (900_000 - 21_000) // MAX - 2


def test_import_stores_a_sparse_file_as_its_dense_copy_without_reading_the_holes(tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    src.mkdir()
    size = 48 << 20
    parts = [(3 << 20, os.urandom(100_000)), (30 << 20, os.urandom(5 << 20)), (size - 10, b"end")]
    write_sparse(src / "sparse.bin", size, parts)
    (src / "dense.bin").write_bytes(dense_bytes(src / "sparse.bin"))
    repo = Repository.init(LocalStore(tmp_path / "repo"))
    meta = MetaCache(tmp_path / "meta")
    try:
        result = run_import(repo, meta, src, "ds")
        reader = NodeReader(repo, meta)
        assert result.snapshot is not None
        root = result.snapshot.root
        sparse = file_spans(reader, resolve(reader, root, b"sparse.bin"))
        dense = file_spans(reader, resolve(reader, root, b"dense.bin"))
    finally:
        meta.close()
    assert [s.id for s in sparse] == [s.id for s in dense]
    c = result.counters
    assert c.logical == 2 * size
    assert c.read_bytes < size + (24 << 20)  # the dense copy whole; of the sparse one, not the holes
    assert c.read_bytes + c.hole_bytes == c.logical
    res = cafs("get", f"{repo.url}#ds", tmp_path / "out")
    assert res.code == 0, res.err
    assert_same_tree(src, tmp_path / "out")


class _CountingStore(PassThroughStore):
    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self.pack_reads = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self.pack_reads += key.startswith("packs/")
        return super().get(key, offset, length)


def test_get_reads_the_chunk_of_a_hole_once_and_leaves_the_hole(tmp_path: Path) -> None:
    """A hole is one chunk of zeros repeated: extracting it reads that chunk once (not
    once per repeat: 20 GiB took 8 s) and writes nothing there, whatever the output."""
    src = tmp_path / "src"
    src.mkdir()
    size = 64 << 20  # 4,096 chunks of zeros at the test chunker's maximum size
    write_sparse(src / "sparse.bin", size, [(1 << 20, os.urandom(50_000)), (size - 3, b"end")])
    with _imported(src, tmp_path) as (store, meta, snapshot):
        counting = _CountingStore(store)
        repo = Repository.open(counting)
        read_back = []
        for _run in range(2):  # the second a re-run over the finished output
            read_before = _bytes_read()
            _extract(repo, meta, snapshot, tmp_path / "out")
            read_back.append(_bytes_read() - read_before)
    assert counting.pack_reads < 100
    assert_same_tree(src, tmp_path / "out")
    assert os.stat(tmp_path / "out" / "sparse.bin").st_blocks * 512 < 8 << 20
    assert read_back[1] < 4 << 20  # the hole is seen with SEEK_DATA, not read back (64 MiB)


@contextmanager
def _imported(src: Path, tmp_path: Path) -> Iterator[tuple[LocalStore, MetaCache, Snapshot]]:
    """``src`` imported as ``ds`` into a new repository of the test chunker's sizes: its
    store, the metadata cache (closed afterwards) and the snapshot."""
    store = LocalStore(tmp_path / "repo")
    Repository.init(store, ChunkerParams(MIN, AVG, MAX))
    meta = MetaCache(tmp_path / "meta")
    try:
        result = run_import(Repository.open(store), meta, src, "ds")
        assert result.snapshot is not None
        yield store, meta, result.snapshot
    finally:
        meta.close()


def _extract(repo: Repository, meta: MetaCache, snapshot: Snapshot, dest: Path) -> None:
    extractor = Extractor(repo, NodeReader(repo, meta))
    try:
        extractor.extract(snapshot.root, dest)
    finally:
        extractor.close()


def _bytes_read() -> int:
    """What this process has read through read(2) and its kin so far (``rchar``)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_get_leaves_holes_inside_chunks_that_hold_data(tmp_path: Path) -> None:
    """Data every 12 KiB, chunks up to 16 KiB: no chunk is all zeros, yet most of the file
    is holes. Such a file came back dense (a 256 MiB image with 4 KiB every 3 MiB took
    256 MiB, not 344 KiB); the zero blocks of a chunk are holes now, as in the source."""
    src = tmp_path / "src"
    src.mkdir()
    size = 1 << 20
    write_sparse(src / "img", size, [(off, os.urandom(100)) for off in range(0, size, 12288)])
    with _imported(src, tmp_path) as (store, meta, snapshot):
        _extract(Repository.open(store), meta, snapshot, tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    allocated = os.stat(src / "img").st_blocks
    assert allocated * 512 < size // 2  # the source is sparse here
    assert os.stat(tmp_path / "out" / "img").st_blocks <= allocated

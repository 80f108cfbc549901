"""Import reads, cuts, hashes and compresses files on worker threads (cafs.chunkprep):
what the parallel pipeline must keep of the serial one - packs in walk order, hard links
read once, files that fail or change named, nothing left open - and that it is parallel."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cafs import chunkprep, importer
from cafs.format.config import ChunkerParams
from cafs.importer import run_import
from cafs.tree import file_spans, walk
from fdcount import open_below
from localrepo import LocalRepo, local_repo
from treegen import assert_same_tree

SMALL = ChunkerParams(min_size=4 << 10, avg_size=16 << 10, max_size=64 << 10)


@pytest.fixture
def r(tmp_path: Path) -> Iterator[LocalRepo]:
    with local_repo(tmp_path, SMALL) as repo:
        yield repo


@pytest.fixture(autouse=True)
def small_whole_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # files above 200 KB take the large-file path (cut on the importing thread)
    monkeypatch.setattr(importer, "WHOLE_READ_MAX", 200 << 10)


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def test_packs_hold_the_files_in_the_order_of_the_walk(r: LocalRepo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    sizes = [5_000, 150_000, 700_000, 1, 90_000, 0, 300_000, 60_000, 20_000, 400_000, 7]
    names = []
    for i, size in enumerate(sizes):
        names.append(f"d/f{i:02d}")
        _write(src / names[-1], size)
        if i == 4:
            names.append("d/g/inner")  # a subdirectory in the middle of the names
            _write(src / names[-1], 120_000)
    result = run_import(r.repo, r.meta, src, "ds")
    assert not result.skipped and result.snapshot is not None
    offsets = []
    for name in sorted(names):  # bytewise: d/f.. then d/g/inner, as the walk meets them
        spans = file_spans(r.reader, r.entry(result.snapshot, name))
        offsets += [(s.pack, s.offset) for s in spans]
    assert len({p for p, _ in offsets}) == 1  # one pack: so offsets are the order written
    assert offsets == sorted(offsets)


def test_the_tree_reads_back_byte_exact(tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    for d in range(3):
        for i in range(40):
            _write(src / f"d{d}" / f"f{i:02d}", (i * 7919) % 260_000)
    (src / "d0" / "same").write_bytes((src / "d1" / "f05").read_bytes())  # dedup within the window
    repo = tmp_path / "repo"
    assert cafs("init", repo).code == 0
    r_ = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r_.code == 0, r_.err
    assert cafs("get", f"{repo}#ds", tmp_path / "out").code == 0
    assert_same_tree(src, tmp_path / "out")


def test_a_hard_link_is_read_once_even_while_its_first_name_is_in_flight(r: LocalRepo, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    _write(src / "a", 100_000)
    os.link(src / "a", src / "b")
    reads = []
    cut_file = chunkprep.ChunkPrep._cut_file

    def counted(self, fd: int, size: int, buffer):  # type: ignore[no-untyped-def]
        reads.append(os.fstat(fd).st_ino)
        return cut_file(self, fd, size, buffer)

    monkeypatch.setattr(chunkprep.ChunkPrep, "_cut_file", counted)
    result = run_import(r.repo, r.meta, src, "ds")
    assert result.snapshot is not None and not result.skipped
    assert reads == [os.stat(src / "a").st_ino]
    a, b = (r.entry(result.snapshot, n) for n in ("a", "b"))
    assert file_spans(r.reader, a) == file_spans(r.reader, b) and a.nlink == b.nlink == 2


def test_files_that_fail_or_change_on_the_workers_are_skipped_by_name(r: LocalRepo, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for name in ("a", "bad", "grows", "z"):
        _write(src / name, 50_000)
    cut_file = chunkprep.ChunkPrep._cut_file

    def faulty(self, fd: int, size: int, buffer):  # type: ignore[no-untyped-def]
        name = os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1]
        if name == "bad":  # its read fails: here, a read of a directory
            dir_fd = os.open(src, os.O_RDONLY)
            try:
                return cut_file(self, dir_fd, size, buffer)
            finally:
                os.close(dir_fd)
        if name == "grows":
            with open(src / "grows", "ab") as f:
                f.write(b"more")
        return cut_file(self, fd, size, buffer)

    monkeypatch.setattr(chunkprep.ChunkPrep, "_cut_file", faulty)
    result = run_import(r.repo, r.meta, src, "ds")
    assert sorted((s.path, s.reason) for s in result.skipped) == [
        (b"bad", "cannot read: Is a directory"),
        (b"grows", importer.CHANGED),
    ]
    assert result.snapshot is not None
    assert [path for path, _ in walk(r.reader, result.snapshot.root)] == [b"", b"a", b"z"]
    assert open_below(src) == 0


def test_a_failed_import_closes_the_files_in_flight(r: LocalRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(30):
        _write(src / f"f{i:02d}", 30_000)
    store_prepared = importer.Importer._store_prepared
    calls = []

    def failing(self, chunks):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return store_prepared(self, chunks)

    monkeypatch.setattr(importer.Importer, "_store_prepared", failing)
    with pytest.raises(RuntimeError, match="boom"):
        run_import(r.repo, r.meta, src, "ds")
    assert open_below(src) == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("cafs-cut")]


def test_files_are_read_on_several_workers(r: LocalRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    for i in range(20):
        _write(src / f"f{i:02d}", 30_000)
    monkeypatch.setattr(chunkprep.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    started = threading.Barrier(2, timeout=10)
    cut_file = chunkprep.ChunkPrep._cut_file

    def meet(self, fd: int, size: int, buffer):  # type: ignore[no-untyped-def]
        if os.fstat(fd).st_size and started.n_waiting < 2:
            try:  # the first two files: each waits until another worker holds one too
                started.wait()
            except threading.BrokenBarrierError:
                pass
        return cut_file(self, fd, size, buffer)

    monkeypatch.setattr(chunkprep.ChunkPrep, "_cut_file", meet)
    result = run_import(r.repo, r.meta, src, "ds")
    assert result.snapshot is not None and not result.skipped
    assert not started.broken  # two files were being read at the same moment


def test_a_directory_of_many_files_is_imported_in_bounded_memory(r: LocalRepo, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The compressed chunks of a file are let go once they are in a pack, not held (by
    the finished job) until the directory's node is made: a directory of many files of
    compressible data took memory in proportion to all of it."""
    import tracemalloc

    src = tmp_path / "src"
    src.mkdir()
    for i in range(400):
        (src / f"f{i:03d}").write_bytes(os.urandom(50_000).hex().encode())  # compresses to about half
    monkeypatch.setattr(chunkprep.os, "sched_getaffinity", lambda pid: {0, 1})
    _write(tmp_path / "warm" / "f", 1000)
    run_import(r.repo, r.meta, tmp_path / "warm", "warm")  # modules loaded on first use are not counted
    tracemalloc.start()
    try:
        result = run_import(r.repo, r.meta, src, "ds")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not result.skipped and result.stored_bytes > 16 << 20
    assert peak < result.stored_bytes // 3  # a few files in flight, not the whole directory


def test_the_read_buffers_hold_no_more_than_the_files_in_flight_may(r: LocalRepo, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Files near WHOLE_READ_MAX after small ones: each read buffer kept the largest file
    it had read, doubled, so all of them held several times PENDING_BYTES."""
    src = tmp_path / "src"
    data = os.urandom(250_000)
    whole = importer.WHOLE_READ_MAX
    for d in range(3):
        for i in range(18):
            (src / f"d{d}").mkdir(parents=True, exist_ok=True)
            (src / f"d{d}" / f"a{i:02d}").write_bytes(data[i:i + 1000])
        for i in range(8):  # a buffer holds each of these, then one byte more is wanted
            (src / f"d{d}" / f"b{i:02d}").write_bytes(data[d + i:][:whole - 1 - d])
            (src / f"d{d}" / f"c{i:02d}").write_bytes(data[d + i + 1:][:whole])
    monkeypatch.setattr(chunkprep.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(importer, "PENDING_BYTES", 3 * whole)
    monkeypatch.setattr(chunkprep, "GRANULE", 4096, raising=False)
    buffers: dict[int, chunkprep.ReadBuffer] = {}
    most = 0
    read = chunkprep.ReadBuffer.read

    def counted(self, fd: int, n: int):  # type: ignore[no-untyped-def]
        nonlocal most
        view = read(self, fd, n)
        buffers[id(self)] = self
        most = max(most, sum(len(b._buf) for b in buffers.values()))
        return view

    monkeypatch.setattr(chunkprep.ReadBuffer, "read", counted)
    result = run_import(r.repo, r.meta, src, "ds")
    assert result.snapshot is not None and not result.skipped
    window = 2 * 8 + 2
    assert most <= importer.PENDING_BYTES + window * 4096


def test_ctrl_c_while_waiting_for_a_file_closes_it_only_once_its_worker_is_done(
        r: LocalRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the importing thread waits for a file's job (KeyboardInterrupt out of
    the wait): the file was closed at once, under the worker still reading it, whose
    descriptor another open may then reuse."""
    src = tmp_path / "src"
    _write(src / "a", 50_000)
    ino = os.stat(src / "a").st_ino
    closing = threading.Event()
    still_open = []

    class Interrupted:  # the job's Future, as SIGINT leaves a wait for it
        def __init__(self, job) -> None:  # type: ignore[no-untyped-def]
            self.job = job

        def result(self):  # type: ignore[no-untyped-def]
            if not self.job.done():
                raise KeyboardInterrupt
            return self.job.result()

        def cancel(self) -> bool:
            return bool(self.job.cancel())

    file, close, cut_file = chunkprep.ChunkPrep.file, chunkprep.ChunkPrep.close, chunkprep.ChunkPrep._cut_file

    def reading(self, fd: int, size: int, buffer):  # type: ignore[no-untyped-def]
        closing.wait(10)  # still reading when the import gives up
        try:
            still_open.append(os.fstat(fd).st_ino == ino)
        except OSError:
            still_open.append(False)
        return cut_file(self, fd, size, buffer)

    def closed(self) -> None:  # type: ignore[no-untyped-def]
        closing.set()
        close(self)

    monkeypatch.setattr(chunkprep.ChunkPrep, "file", lambda self, fd, size: Interrupted(file(self, fd, size)))
    monkeypatch.setattr(chunkprep.ChunkPrep, "_cut_file", reading)
    monkeypatch.setattr(chunkprep.ChunkPrep, "close", closed)
    with pytest.raises(KeyboardInterrupt):
        run_import(r.repo, r.meta, src, "ds")
    assert still_open == [True]
    assert open_below(src) == 0
    assert r.repo.snapshots("ds") == []  # nothing committed

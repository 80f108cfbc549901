"""Incremental import: what a re-import takes unchanged from the previous snapshot of the
ref, entry by entry and node by node, and that what it builds reads back byte-exact."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cafs.format.nodes import DirIndexNode
from cafs.repository import Repository
from cafs.stores.local import LocalStore
from cafs.tree import file_spans
from storewrap import PassThroughStore
from localrepo import LocalRepo, local_repo
from treegen import assert_same_tree


@pytest.fixture
def r(tmp_path: Path) -> Iterator[LocalRepo]:
    with local_repo(tmp_path) as repo:
        yield repo


def _files(d: Path, n: int, size: int = 100) -> None:
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"f{i:05d}").write_bytes(os.urandom(size))


def test_an_unchanged_directory_keeps_its_node_when_a_sibling_changes(r: LocalRepo, tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    _files(src / "a", 5)
    _files(src / "b" / "deep", 5)
    (src / "b" / "link").symlink_to("deep/f00000")
    first = r.import_(src).snapshot
    (src / "a" / "new").write_bytes(b"new bytes")
    second = r.import_(src)
    assert second.counters.read_bytes == len(b"new bytes")
    assert r.entry(second.snapshot, "b").ref == r.entry(first, "b").ref
    assert r.entry(second.snapshot, "a").ref != r.entry(first, "a").ref
    assert r.entry(second.snapshot, "a/f00001") == r.entry(first, "a/f00001")
    res = cafs("get", f"{r.repo.url}#ds", tmp_path / "out")
    assert res.code == 0, res.err
    assert_same_tree(src, tmp_path / "out")


def test_a_mode_change_alone_keeps_the_content_without_reading(r: LocalRepo, tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    _files(src, 3, size=5000)
    first = r.import_(src).snapshot
    os.chmod(src / "f00001", 0o600)
    second = r.import_(src)
    assert second.counters.read_bytes == 0
    old, new = r.entry(first, "f00001"), r.entry(second.snapshot, "f00001")
    assert new.mode == 0o600 and old.mode != 0o600
    assert file_spans(r.reader, new) == file_spans(r.reader, old)
    res = cafs("get", f"{r.repo.url}#ds", tmp_path / "out")
    assert res.code == 0, res.err
    assert_same_tree(src, tmp_path / "out")


def test_a_directory_of_several_pages_is_compared_across_all_of_them(r: LocalRepo, tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    _files(src / "big", 2500, size=10)  # three pages of at most 1024 entries
    first = r.import_(src).snapshot
    again = r.import_(src)
    assert again.counters.read_bytes == 0
    assert again.snapshot is not None and first is not None
    assert again.snapshot.root_id == first.root_id
    last = src / "big" / "f02499"  # on the last page
    last.write_bytes(b"0123456789")
    os.utime(last, ns=(0, last.stat().st_mtime_ns + 10**9))
    third = r.import_(src)
    assert third.counters.read_bytes == 10
    assert third.counters.reused_files == 2499
    assert third.snapshot is not None
    before, after = (r.reader.node(r.entry(s, "big").ref) for s in (first, third.snapshot))
    assert isinstance(before, DirIndexNode) and isinstance(after, DirIndexNode)
    # the unchanged entries are written back as they were: two pages keep their nodes
    assert [p.ref for p in after.pages[:2]] == [p.ref for p in before.pages[:2]]
    assert after.pages[2].ref != before.pages[2].ref
    res = cafs("get", f"{r.repo.url}#ds", tmp_path / "out")
    assert res.code == 0, res.err
    assert_same_tree(src, tmp_path / "out")


def test_names_that_change_kind_between_imports(r: LocalRepo, tmp_path: Path, cafs) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "was-file").write_bytes(b"file")
    (src / "was-dir").mkdir()
    (src / "was-dir" / "inner").write_bytes(b"inner")
    (src / "was-link").symlink_to("was-file")
    (src / "kept").write_bytes(b"kept")
    r.import_(src)
    (src / "was-file").unlink()
    (src / "was-file").mkdir()
    (src / "was-file" / "now-inside").write_bytes(b"now")
    (src / "was-dir" / "inner").unlink()
    (src / "was-dir").rmdir()
    (src / "was-dir").symlink_to("kept")
    (src / "was-link").unlink()
    (src / "was-link").write_bytes(b"was a link")
    second = r.import_(src)
    assert second.counters.reused_files == 1  # kept
    res = cafs("get", f"{r.repo.url}#ds", tmp_path / "out")
    assert res.code == 0, res.err
    assert_same_tree(src, tmp_path / "out")


class _SlowIndexReads(PassThroughStore):
    """Index objects answer after a delay, as from a remote store; counts the reads of
    them under way at once."""

    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if not key.startswith("index/"):
            return super().get(key, offset, length)
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        try:
            time.sleep(0.05)
            return super().get(key, offset, length)
        finally:
            with self._lock:
                self._now -= 1


def test_index_objects_of_a_remote_store_are_read_several_at_a_time(r: LocalRepo, tmp_path: Path) -> None:
    # one index object per import until gc merges them: read one by one, each would cost
    # a remote store's first-byte latency
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(3000))
        r.import_(src)
    assert len(list((tmp_path / "repo" / "index").iterdir())) == 6
    slow = _SlowIndexReads(LocalStore(tmp_path / "repo"))
    got = Repository.open(slow).load_index()
    assert slow.most > 1
    assert got.objects == r.repo.load_index().objects and len(got.objects) == 6 + 6  # a chunk and a node each


def _fat_mtime(path: Path, seconds: int) -> None:
    """Set ``path``'s mtime as FAT records any write within the two seconds from
    ``seconds`` (even): a whole, even second."""
    os.utime(path, (seconds, seconds))


def test_a_file_written_again_within_the_mtime_granule_is_read_again(r: LocalRepo, tmp_path: Path) -> None:
    # On FAT a file's mtime is kept in 2-second steps: written, imported, and written
    # again with the same size within those two seconds, it looks untouched.
    src = tmp_path / "src"
    src.mkdir()
    f = src / "labels.csv"
    granule = int(time.time()) // 2 * 2
    f.write_bytes(b"cat,1\n")
    _fat_mtime(f, granule)
    r.import_(src)
    f.write_bytes(b"dog,2\n")
    _fat_mtime(f, granule)
    second = r.import_(src)
    assert second.snapshot is not None
    entry = r.entry(second.snapshot, "labels.csv")
    assert b"".join(r.repo.read_object(s) for s in file_spans(r.reader, entry)) == b"dog,2\n"


def test_a_whole_second_mtime_long_before_the_import_is_trusted(r: LocalRepo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    f = src / "old.bin"
    f.write_bytes(b"x" * 100)
    _fat_mtime(f, int(time.time()) - 3600)
    r.import_(src)
    again = r.import_(src)
    assert again.counters.reused_files == 1 and again.counters.read_bytes == 0

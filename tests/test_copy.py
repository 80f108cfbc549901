"""``cafs copy``: snapshots and the packs they need, from one repository to another.

Real repositories made by the real importer. The oracles: ``cafs get`` from the copy
equals the source tree; ``cafs fsck`` passes on the copy; journal entries have the
same keys and bytes in both; packs are the source's, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest

from cafs.copy import CopyConflict, copy_snapshots, open_destination
from cafs.errors import NoSpaceError, StoreError
from cafs.format.config import ChunkerParams
from cafs.format.index import decode_index
from cafs.format.pack import KIND_DATA
from cafs.locks import locked
from cafs.repository import Repository
from cafs.stores import LocalStore, open_store
from mountfix import kill_cafs_when
from storewrap import PassThroughStore
from treegen import assert_same_tree, make_tree, mutate_tree

SMALL = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "128K")
TMP_PREFIX = ".tmp-"


def files_under(repo: Path, top: str) -> dict[str, bytes]:
    """Relative path -> bytes of every complete object under ``repo/top``."""
    base = repo / top
    if not base.exists():
        return {}
    return {str(p.relative_to(repo)): p.read_bytes() for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(TMP_PREFIX)}


def pack_names(repo: Path) -> set[str]:
    return {p.name for p in (repo / "packs").glob("*/*") if not p.name.startswith(TMP_PREFIX)} \
        if (repo / "packs").exists() else set()


def write_tree(root: Path, rnd: random.Random, files: int, size: tuple[int, int]) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i:03d}").write_bytes(rnd.randbytes(rnd.randrange(*size)))
    return root


# -- a source repository, built once; each test works on its own copy -----------------------


class Base:
    def __init__(self, top: Path) -> None:
        self.top = top
        self.repo = top / "repo"
        self.tree = top / "tree"  # ref ds, jid 1
        self.other = [top / f"other{i}" for i in (1, 2, 3)]  # ref other: jids 1 and 3 (2 forgotten)
        self.cache = top / "cache"


def run(*args: str | os.PathLike[str]) -> int:
    from cafs.cli import main

    return main([os.fspath(a) for a in args])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    b = Base(tmp_path_factory.mktemp("copybase"))
    make_tree(b.tree, seed=11, big_file_size=1 << 20)
    rnd = random.Random(5)
    for path in b.other:
        write_tree(path, rnd, 6, (1000, 200_000))
    assert run("init", b.repo, *SMALL) == 0
    assert run("import", b.tree, b.repo, "--name", "ds", "--no-progress", "--cache", b.cache) == 0
    for path in b.other:
        assert run("import", path, b.repo, "--name", "other", "--no-progress", "--cache", b.cache) == 0
    assert run("forget", b.repo, "other", "--jid", "2", "--cache", b.cache) == 0
    return b


@pytest.fixture
def src(base: Base, tmp_path: Path) -> Path:
    path = tmp_path / "src"
    shutil.copytree(base.repo, path)
    return path


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    return tmp_path / "dst"


def copy_json(cafs, *args: str | os.PathLike[str]) -> dict:
    r = cafs("copy", *args, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def snapshots(cafs, repo: Path) -> list[dict]:
    r = cafs("snapshots", repo, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def fsck(cafs, repo: Path) -> None:
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err


# -- copying -----------------------------------------------------------------------------------


def test_copy_to_new_repository_then_get_is_byte_exact(cafs, base: Base, src: Path, dst: Path,
                                                       tmp_path: Path) -> None:
    doc = copy_json(cafs, f"{src}#ds", dst)
    assert doc["created"] and doc["copied"] == ["ds@1"] and doc["packs_copied"] > 3
    r = cafs("get", f"{dst}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.tree, tmp_path / "out")


def test_new_mirror_has_the_source_config_and_repo_id(cafs, src: Path, dst: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    assert (dst / "config").read_bytes() == (src / "config").read_bytes()


def test_fsck_passes_after_copy(cafs, src: Path, dst: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    fsck(cafs, dst)


def test_packs_and_journal_entries_are_copied_verbatim(cafs, src: Path, dst: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    theirs, ours = files_under(src, "packs"), files_under(dst, "packs")
    assert ours and all(theirs[key] == data for key, data in ours.items())
    assert files_under(dst, "refs") == {k: v for k, v in files_under(src, "refs").items() if "/ds/" in k}


def test_only_the_packs_of_the_named_snapshot_are_copied(cafs, src: Path, dst: Path) -> None:
    copy_json(cafs, f"{src}#other@1", dst)
    assert [(s["ref"], s["jid"]) for s in snapshots(cafs, dst)] == [("other", 1)]
    assert len(pack_names(dst)) < len(pack_names(src)) / 2
    fsck(cafs, dst)


def test_second_copy_copies_nothing(cafs, src: Path, dst: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    before = files_under(dst, "packs") | files_under(dst, "index") | files_under(dst, "refs")
    doc = copy_json(cafs, f"{src}#ds", dst)
    assert (doc["copied"], doc["present"], doc["packs_copied"], doc["bytes_copied"]) == ([], ["ds@1"], 0, 0)
    assert not doc["created"]
    assert files_under(dst, "packs") | files_under(dst, "index") | files_under(dst, "refs") == before


def test_incremental_copy_copies_only_new_packs(cafs, base: Base, src: Path, dst: Path,
                                                tmp_path: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    tree2 = tmp_path / "tree2"
    shutil.copytree(base.tree, tree2, symlinks=True)
    mutate_tree(tree2, seed=3)
    before = pack_names(src)
    r = cafs("import", tree2, src, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    new = pack_names(src) - before
    doc = copy_json(cafs, f"{src}#ds", dst)
    assert doc["copied"] == ["ds@2"]
    assert doc["packs_copied"] == len(new) and pack_names(dst) - pack_names(src) == set()
    assert doc["packs_present"] > 0  # unchanged files live in the packs copied before
    for jid, tree in ((1, base.tree), (2, tree2)):
        r = cafs("get", f"{dst}#ds@{jid}", tmp_path / f"out{jid}")
        assert r.code == 0, r.err
        assert_same_tree(tree, tmp_path / f"out{jid}")


def test_all_copies_every_ref_with_identical_jids(cafs, base: Base, src: Path, dst: Path,
                                                  tmp_path: Path) -> None:
    doc = copy_json(cafs, src, "--all", dst)
    assert doc["copied"] == ["ds@1", "other@1", "other@3"]
    assert snapshots(cafs, dst) == snapshots(cafs, src)
    assert files_under(dst, "refs") == files_under(src, "refs")
    r = cafs("get", f"{dst}#other@3", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.other[2], tmp_path / "out")
    fsck(cafs, dst)


def test_all_of_one_ref(cafs, src: Path, dst: Path) -> None:
    doc = copy_json(cafs, f"{src}#other", "--all", dst)
    assert doc["copied"] == ["other@1", "other@3"]


def test_copy_after_the_source_was_repacked(cafs, base: Base, src: Path, dst: Path, tmp_path: Path) -> None:
    """Spans of other@3 name packs gc has replaced: the packs holding the objects now are
    copied, and the copy reads them by id, as the source does."""
    assert cafs("forget", src, "other", "--jid", "1").code == 0
    r = cafs("gc", src, "--repack-below", "1")
    assert r.code == 0, r.err
    copy_json(cafs, f"{src}#other", dst)
    r = cafs("get", f"{dst}#other", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.other[2], tmp_path / "out")
    fsck(cafs, dst)


def test_existing_destination_with_other_chunking(cafs, base: Base, src: Path, dst: Path,
                                                  tmp_path: Path) -> None:
    assert cafs("init", dst, "--pack-size", "1M").code == 0
    doc = copy_json(cafs, f"{src}#ds", dst)
    assert doc["copied"] == ["ds@1"] and doc["config_differs"] and not doc["created"]
    r = cafs("get", f"{dst}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.tree, tmp_path / "out")
    fsck(cafs, dst)


def _entries_with_blocks(repo: Path) -> tuple[int, int]:
    """(entries recording st_blocks, entries) of every snapshot of ``repo``."""
    from cafs.metacache import NodeReader
    from cafs.tree import walk

    r = Repository.open(LocalStore(repo))
    reader = NodeReader(r, None)
    seen = [e for ref in r.ref_names() for _, e in walk(reader, r.snapshot(ref).root)]
    return sum(e.blocks is not None for e in seen), len(seen)


def test_a_repository_of_format_2_stays_readable_by_its_makers(cafs, base: Base, tmp_path: Path) -> None:
    old, mirror = tmp_path / "old", tmp_path / "mirror"
    Repository.init(LocalStore(old), ChunkerParams(16 << 10, 64 << 10, 256 << 10), 128 << 10, version=2)  # as a cafs of format 2 made it
    r = cafs("import", base.tree, old, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    with_blocks, total = _entries_with_blocks(old)
    assert with_blocks == 0 and total > 20  # ten-field entries, which that cafs reads
    copy_json(cafs, f"{old}#ds", mirror)
    assert json.loads((mirror / "config").read_bytes())["version"] == 2  # a mirror keeps the version
    r = cafs("get", f"{mirror}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.tree, tmp_path / "out")


def test_a_repository_of_format_1_gets_journal_entries_its_makers_read(cafs, base: Base, tmp_path: Path) -> None:
    import msgpack

    old = tmp_path / "old"
    Repository.init(LocalStore(old), ChunkerParams(16 << 10, 64 << 10, 256 << 10), 128 << 10, version=1)
    r = cafs("import", base.tree, old, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    [entry] = (old / "refs" / "ds").glob("0*")
    # a cafs of format 1 reads an entry as one msgpack map (a digest after it is 'extra data')
    assert msgpack.unpackb(entry.read_bytes())["v"] == 1
    r = cafs("get", f"{old}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.tree, tmp_path / "out")


def test_snapshots_of_format_2_are_not_copied_into_a_repository_of_format_1(cafs, base: Base, tmp_path: Path,
                                                                            dst: Path) -> None:
    newer = tmp_path / "newer"
    Repository.init(LocalStore(newer), ChunkerParams(16 << 10, 64 << 10, 256 << 10), 128 << 10, version=2)
    assert cafs("import", base.other[0], newer, "--name", "ds", "--no-progress").code == 0
    Repository.init(LocalStore(dst), version=1)
    r = cafs("copy", f"{newer}#ds", dst)
    assert r.code == 1
    assert f"{dst}: repository format version 1" in r.err and "new or empty repository" in r.err
    assert sorted(p.name for p in dst.iterdir()) == ["config"]  # nothing copied


def test_snapshots_of_format_3_are_not_copied_into_a_repository_of_format_2(cafs, src: Path, dst: Path) -> None:
    assert _entries_with_blocks(src)[0] > 20
    Repository.init(LocalStore(dst), version=2)
    r = cafs("copy", f"{src}#ds", dst)
    assert r.code == 1
    assert f"{dst}: repository format version 2" in r.err and "new or empty repository" in r.err
    assert sorted(p.name for p in dst.iterdir()) == ["config"]  # nothing copied


def test_summary_on_a_terminal_free_run(cafs, src: Path, dst: Path) -> None:
    r = cafs("copy", f"{src}#ds", dst)
    assert r.code == 0, r.err
    assert "copied 1 snapshot(s)" in r.out and "packs" in r.out and "/s)" in r.out
    assert r.err == ""  # no progress line outside a terminal


# -- refusals ----------------------------------------------------------------------------------


def test_a_different_entry_at_the_same_jid_is_a_conflict(cafs, base: Base, src: Path, dst: Path) -> None:
    assert cafs("init", dst, *SMALL).code == 0
    assert cafs("import", base.other[0], dst, "--name", "ds", "--no-progress").code == 0
    refs, packs = files_under(dst, "refs"), pack_names(dst)
    r = cafs("copy", f"{src}#ds@1", dst)
    assert r.code == 1
    assert "ds@1" in r.err and "different" in r.err
    assert files_under(dst, "refs") == refs and pack_names(dst) == packs


def test_corrupt_pack_in_source_is_refused(cafs, base: Base, src: Path, dst: Path, tmp_path: Path) -> None:
    copy_json(cafs, f"{src}#ds", dst)
    refs = files_under(dst, "refs")
    before = pack_names(src)
    fresh = write_tree(tmp_path / "fresh", random.Random(77), 4, (50_000, 200_000))
    assert cafs("import", fresh, src, "--name", "ds", "--no-progress").code == 0
    repo = Repository.open(open_store(str(src)))
    sizes = repo.list_packs()
    victim = next(p for p in sorted(sizes) if p.hex() not in before
                  and repo.read_trailer(p, sizes[p]).kind == KIND_DATA)
    path = src / "packs" / victim.hex()[:2] / victim.hex()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    r = cafs("copy", f"{src}#ds", dst)
    assert r.code == 1
    assert victim.hex() in r.err and "damaged" in r.err
    assert files_under(dst, "refs") == refs
    assert victim.hex() not in pack_names(dst)
    fsck(cafs, dst)


@pytest.mark.parametrize("case", ["missing source", "unknown ref", "unknown jid", "no snapshot named",
                                  "--all with a jid", "a path", "destination not a repository"])
def test_errors(cafs, src: Path, dst: Path, tmp_path: Path, case: str) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("not a repository\n")
    args, code, words = {
        "missing source": ([f"{tmp_path / 'nowhere'}#ds", dst], 1, "not a cafs repository"),
        "unknown ref": ([f"{src}#nope", dst], 1, "no ref named 'nope'"),
        "unknown jid": ([f"{src}#ds@7", dst], 1, "no snapshot 7"),
        "no snapshot named": ([src, dst], 2, "--all"),
        "--all with a jid": ([f"{src}#ds@1", "--all", dst], 2, "without '@JID'"),
        "a path": ([f"{src}#ds:data", dst], 2, "whole snapshots"),
        "destination not a repository": ([f"{src}#ds", tmp_path / "junk"], 1, "not a cafs repository"),
    }[case]
    r = cafs("copy", *args)
    assert r.code == code, r.err
    assert words in r.err
    assert not (dst / "refs").exists()


def test_copy_refuses_while_a_gc_holds_the_destination(cafs, src: Path, dst: Path) -> None:
    assert cafs("init", dst, *SMALL).code == 0
    with locked(LocalStore(dst), "exclusive"):
        r = cafs("copy", f"{src}#ds", dst)
    assert r.code == 1 and "in use" in r.err
    assert not (dst / "refs").exists()


# -- interruptions -------------------------------------------------------------------------------


class FailingStore(PassThroughStore):
    """A local store whose pack puts fail after ``allowed`` of them succeed."""

    def __init__(self, inner: LocalStore, allowed: int, error: type[StoreError] = StoreError) -> None:
        super().__init__(inner)
        self.allowed = allowed
        self.error = error

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        if key.startswith("packs/"):
            if self.allowed <= 0:
                raise self.error(f"{self.url}: injected failure writing {key}")
            self.allowed -= 1
        super().put(key, data, exclusive=exclusive)


def test_copy_failing_after_some_packs_resumes(cafs, base: Base, src: Path, dst: Path,
                                              tmp_path: Path) -> None:
    source = Repository.open(open_store(str(src)))
    target, created = open_destination(source, FailingStore(LocalStore(dst), allowed=4))
    assert created
    with pytest.raises(StoreError, match="injected"):
        copy_snapshots(source, target, [("ds", 1)], jobs=1)
    assert not files_under(dst, "refs")
    done = len(pack_names(dst))
    assert done == 4
    doc = copy_json(cafs, f"{src}#ds", dst)
    assert doc["copied"] == ["ds@1"] and doc["packs_present"] == done and doc["packs_copied"] > 0
    r = cafs("get", f"{dst}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(base.tree, tmp_path / "out")
    fsck(cafs, dst)


def test_an_interrupted_copy_leaves_its_packs_indexed_in_batches(cafs, src: Path, dst: Path) -> None:
    source = Repository.open(open_store(str(src)))
    target, _ = open_destination(source, FailingStore(LocalStore(dst), allowed=5))
    with pytest.raises(StoreError, match="injected"):
        copy_snapshots(source, target, [("ds", 1)], jobs=1, index_every=2)
    indexed = {p.pack_id.hex() for key in files_under(dst, "index")
               for p in decode_index(files_under(dst, "index")[key])}
    assert len(files_under(dst, "index")) == 2 and len(indexed) == 4 and indexed <= pack_names(dst)
    fsck(cafs, dst)


def test_full_destination_is_a_clear_error(src: Path, dst: Path) -> None:
    source = Repository.open(open_store(str(src)))
    target, _ = open_destination(source, FailingStore(LocalStore(dst), allowed=2, error=NoSpaceError))
    with pytest.raises(NoSpaceError, match="run the copy again"):
        copy_snapshots(source, target, [("ds", 1)])
    assert not files_under(dst, "refs")


def test_conflict_is_raised_before_anything_is_written(cafs, base: Base, src: Path, dst: Path) -> None:
    assert cafs("init", dst, *SMALL).code == 0
    assert cafs("import", base.other[0], dst, "--name", "other", "--no-progress").code == 0
    packs = pack_names(dst)
    source = Repository.open(open_store(str(src)))
    target = Repository.open(open_store(str(dst)))
    with pytest.raises(CopyConflict, match="other@1"):
        copy_snapshots(source, target, [("ds", 1), ("other", 1)])
    assert pack_names(dst) == packs and not (dst / "refs" / "ds").exists()


@pytest.fixture(scope="module")
def big_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 12 MB of random files in 64 KiB packs: a copy of it takes long enough to kill."""
    top = tmp_path_factory.mktemp("copybig")
    write_tree(top / "tree", random.Random(9), 60, (100_000, 300_000))
    assert run("init", top / "repo", "--chunk-min", "16K", "--chunk-avg", "32K", "--chunk-max", "64K",
               "--pack-size", "64K") == 0
    assert run("import", top / "tree", top / "repo", "--name", "big", "--no-progress",
               "--cache", top / "cache") == 0
    return top


def test_kill_9_mid_copy_then_resume(cafs, big_src: Path, dst: Path, tmp_path: Path) -> None:
    src = big_src / "repo"
    status = kill_cafs_when(["copy", f"{src}#big", dst, "--jobs", "1", "--no-progress"],
                            lambda: len(pack_names(dst)) >= 3, "a third copied pack")
    if status == -signal.SIGKILL:
        assert not files_under(dst, "refs")  # killed before the commit: no ref at all
    fsck(cafs, dst)
    done = len(pack_names(dst))
    doc = copy_json(cafs, f"{src}#big", dst)
    assert doc["packs_present"] >= done and doc["packs_copied"] + doc["packs_present"] == len(pack_names(src))
    r = cafs("get", f"{dst}#big", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(big_src / "tree", tmp_path / "out")
    fsck(cafs, dst)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_stalled_destination_fails_within_cafs_timeout(cafs, src: Path, tmp_path: Path, nginx_server,
                                                         fault_proxy, monkeypatch: pytest.MonkeyPatch,
                                                         existing: bool) -> None:
    """CAFS_TIMEOUT bounds the waits on DST as on SRC: a destination that stalls fails the
    copy after about that long, not after the default 30 s."""
    www = tmp_path / "www"
    www.mkdir()
    if existing:
        assert cafs("init", www / "dst", *SMALL).code == 0
    proxy = fault_proxy(nginx_server(www))
    proxy.set_mode("stall", method="PUT", match=r"/locks/")
    monkeypatch.setenv("CAFS_TIMEOUT", "2")
    started = time.monotonic()
    r = cafs("copy", f"{src}#ds", f"{proxy.url}/dst", "--no-progress")
    assert r.code == 1 and "locks/" in r.err, r.out + r.err
    assert time.monotonic() - started < 12, r.err
    assert not (www / "dst" / "refs").exists()


def test_a_byte_flipped_in_transit_is_read_again(cafs, base: Base, src: Path, dst: Path, tmp_path: Path,
                                                 nginx_server, fault_proxy) -> None:
    """A source pack whose bytes fail verification once, on the way, is read again rather
    than called damaged: the copy completes, with the right bytes."""
    proxy = fault_proxy(nginx_server(src.parent))
    url = f"{proxy.url}/src"
    assert cafs("ls", "-R", f"{url}#ds").code == 0  # the nodes in this host's cache: the copy reads packs only
    proxy.set_mode("flip_bytes", method="GET", match=r"/packs/../[0-9a-f]{64}$", ranged=False, times=1)
    r = cafs("copy", f"{url}#ds", dst, "--no-progress")
    assert proxy.faults_fired == 1
    assert r.code == 0, r.err
    fsck(cafs, dst)
    assert cafs("get", f"{dst}#ds", tmp_path / "out").code == 0
    assert_same_tree(base.tree, tmp_path / "out")

"""gc repacking: live objects move to new packs verbatim, and every reader (get, fsck, a
mount that was already running) finds them by id, so snapshots and root ids never change."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cafs.repository import Repository
from cafs.stores import open_store
from mountfix import Mount, mounted
from treegen import assert_same_tree

INIT = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "1M")
FILES = 40
FILE_SIZE = 100_000


def write_files(root: Path, indices: range, seed: int) -> None:
    import random

    rng = random.Random(seed)
    for i in indices:
        (root / f"f{i:02d}").write_bytes(rng.randbytes(FILE_SIZE))


@pytest.fixture
def half_garbage(cafs, tmp_path: Path) -> tuple[Path, Path]:
    """A repository whose packs are about half garbage: every other file was rewritten
    and the first snapshot forgotten."""
    repo, src = tmp_path / "repo", tmp_path / "src"
    src.mkdir()
    assert cafs("init", repo, *INIT).code == 0
    write_files(src, range(FILES), seed=1)
    assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
    write_files(src, range(0, FILES, 2), seed=2)
    assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
    assert cafs("forget", repo, "x", "--keep-last", "1").code == 0
    return repo, src


def packs(repo: Path) -> set[str]:
    return {p.name for p in (repo / "packs").glob("*/*")}


def test_repack_moves_live_objects_and_keeps_root_ids(cafs, half_garbage: tuple[Path, Path], tmp_path: Path) -> None:
    repo, src = half_garbage
    root_before = Repository.open(open_store(str(repo))).snapshot("x").root_id
    before = packs(repo)
    r = cafs("gc", repo)
    assert r.code == 0, r.err
    assert "repacked" in r.out and " 0;" not in r.out.split("repacked")[1][:4], r.out
    after = packs(repo)
    assert before - after and after - before  # old packs deleted, new ones written
    assert Repository.open(open_store(str(repo))).snapshot("x").root_id == root_before
    assert cafs("fsck", repo, "--read-data").code == 0
    assert cafs("get", f"{repo}#x", tmp_path / "out").code == 0
    assert_same_tree(src, tmp_path / "out")


def test_repack_reclaims_about_the_garbage(cafs, half_garbage: tuple[Path, Path]) -> None:
    repo, _src = half_garbage
    size = lambda: sum(p.stat().st_size for p in (repo / "packs").glob("*/*"))  # noqa: E731
    garbage = (FILES // 2) * FILE_SIZE  # the first versions of the rewritten files
    before = size()
    # the first import's packs are about half garbage: repack anything not 90% live
    assert cafs("gc", repo, "--repack-below", "0.9").code == 0
    assert size() <= before - 0.9 * garbage


def test_a_running_mount_reads_repacked_files(cafs, half_garbage: tuple[Path, Path], tmp_path: Path,
                                              cache_dir: Path) -> None:
    repo, src = half_garbage
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{repo}#x", mnt, f"cache={cache_dir},cache_mode=meta"):
        first = (mnt / "f01").read_bytes()  # resolves the tree before gc moves things
        assert cafs("gc", repo).code == 0
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        assert first == (src / "f01").read_bytes()
        for i in range(FILES):
            assert (mnt / f"f{i:02d}").read_bytes() == (src / f"f{i:02d}").read_bytes()


def test_a_running_mount_reads_files_repacked_twice_in_a_row(cafs, tmp_path: Path, cache_dir: Path,
                                                             nginx_server) -> None:
    # the mount finds a moved object through the repository index it loaded at most
    # RELOCATION_RELOAD seconds ago; a second gc within that time moved the objects on
    # again, and reads then failed with EIO (the index named a pack that was gone).
    # Over HTTP: a mount reading a local repository in place may still hold the old packs open
    import random

    www, mnt = tmp_path / "www", tmp_path / "mnt"
    repo = www / "repo"
    mnt.mkdir()
    www.mkdir()
    assert cafs("init", repo, *INIT).code == 0
    rng = random.Random(5)
    trees = {name: tmp_path / name for name in ("mix", "keep", "other", "tiny")}
    for path in trees.values():
        path.mkdir()
    for i in range(FILES):  # keep's, other's and garbage files side by side in the same packs
        for kind in ("keep", "other", "junk"):
            data = rng.randbytes(FILE_SIZE)
            (trees["mix"] / f"f{i:02d}-{kind}").write_bytes(data)
            if kind != "junk":
                (trees[kind] / f"f{i:02d}").write_bytes(data)
    (trees["tiny"] / "t").write_bytes(b"t")
    for ref, tree in (("mix", "mix"), ("keep", "keep"), ("other", "other"), ("mix", "tiny"), ("other", "tiny")):
        assert cafs("import", trees[tree], repo, "--name", ref, "--no-progress").code == 0
    assert cafs("forget", repo, "mix", "--jid", "1").code == 0
    server = nginx_server(www)
    with mounted(f"{server.url}/repo#keep", mnt, f"cache={cache_dir},cache_mode=meta"):
        assert (mnt / "f00").read_bytes() == (trees["keep"] / "f00").read_bytes()  # resolves the tree
        r = cafs("gc", repo, "--repack-below", "0.9")  # the junk goes; keep's and other's objects move
        assert r.code == 0 and "repacked 0" not in r.out, r.out
        # a moved object read: the mount loads the index
        assert (mnt / "f20").read_bytes() == (trees["keep"] / "f20").read_bytes()
        assert cafs("forget", repo, "other", "--jid", "1").code == 0
        r = cafs("gc", repo, "--repack-below", "0.9")  # other's objects go; keep's move on
        assert r.code == 0 and "repacked 0" not in r.out, r.out
        for i in reversed(range(1, 20)):
            assert (mnt / f"f{i:02d}").read_bytes() == (trees["keep"] / f"f{i:02d}").read_bytes(), i



@contextmanager
def collected_under_a_mount(cafs, tmp_path: Path, *, look_up: str | None) -> Iterator[Mount]:  # type: ignore[no-untyped-def]
    """A mount of snapshot x@1 (where ``look_up`` was looked up, if given: its directory's
    node loaded, no chunk read), then x@1 forgotten and collected by gc under it: every
    file of it was rewritten in x@2."""
    repo, src, mnt = tmp_path / "repo", tmp_path / "src", tmp_path / "mnt"
    (src / "sub").mkdir(parents=True)
    mnt.mkdir()
    assert cafs("init", repo, *INIT).code == 0
    write_files(src / "sub", range(4), seed=1)
    assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
    # a cache of its own: the importer's holds every node it wrote
    with mounted(f"{repo}#x", mnt, f"cache={tmp_path / 'mount-cache'},cache_mode=meta", expect_warnings=True) as m:
        if look_up is not None:
            assert (mnt / look_up).stat().st_size == FILE_SIZE
        write_files(src / "sub", range(4), seed=3)
        assert cafs("import", src, repo, "--name", "x", "--no-progress").code == 0
        assert cafs("forget", repo, "x", "--keep-last", "1").code == 0
        r = cafs("gc", repo)
        assert r.code == 0 and "deleted 0" not in r.out, r.out
        yield m


def _gone_lines(m: Mount) -> list[str]:
    return [line for line in m.log_problems() if "x@1 is no longer in the repository" in line and "cafs gc" in line]


def test_a_read_of_a_collected_snapshot_says_it_was_collected(cafs, tmp_path: Path) -> None:
    # the log said only "…/packs/ab/abee…: not found", which told an operator nothing
    # about the forget and gc that had removed the mounted snapshot's data
    with collected_under_a_mount(cafs, tmp_path, look_up="sub/f00") as m:
        with pytest.raises(OSError) as err:
            (m.path / "sub/f00").read_bytes()
        assert err.value.errno == errno.EIO
        assert _gone_lines(m), m.log_problems()


def test_a_listing_of_a_collected_snapshot_says_it_was_collected(cafs, tmp_path: Path) -> None:
    with collected_under_a_mount(cafs, tmp_path, look_up=None) as m:
        with pytest.raises(OSError) as err:
            os.listdir(m.path / "sub")
        assert err.value.errno == errno.EIO
        assert _gone_lines(m), m.log_problems()

"""gc repacking: live objects move to new packs verbatim, and every reader (get, fsck, a
mount that was already running) finds them by id, so snapshots and root ids never change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cafs.repository import Repository
from cafs.stores import open_store
from mountfix import mounted
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

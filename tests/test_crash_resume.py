"""``kill -9`` of ``cafs import`` at chosen points, then resume.

After a kill the ref is as it was (or, if the import got to commit, holds one complete
entry), ``cafs fsck`` passes, and a re-run finishes the import without storing again
what the killed run had stored: at most the packs in flight at the kill are lost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mountfix import kill_cafs_when
from treegen import assert_same_tree

PACK_SIZE = 512 << 10
SLACK = 256 << 10  # metadata packs and pack trailers
TMP_PREFIX = ".tmp-"


def complete_files(repo: Path, under: str) -> list[Path]:
    top = repo / under
    return [p for p in top.rglob("*") if p.is_file() and not p.name.startswith(TMP_PREFIX)] if top.exists() else []


def journal_entries(repo: Path) -> list[Path]:
    """The ref journal's entries, not its advisory ``latest`` pointer (written after
    the entry that commits, so a kill may fall between the two or after both)."""
    return [p for p in complete_files(repo, "refs") if p.name != "latest"]


def packs_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in complete_files(repo, "packs"))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 32 MB of random bytes: two big files, mid-sized ones and many small ones."""
    root = tmp_path_factory.mktemp("crash") / "src"
    rnd = random.Random(2024)
    (root / "big").mkdir(parents=True)
    for i in range(2):
        (root / "big" / f"b{i}").write_bytes(os.urandom(8 << 20))
    (root / "mid").mkdir()
    for i in range(20):
        (root / "mid" / f"m{i:02d}").write_bytes(os.urandom(rnd.randrange(200_000, 500_000)))
    for d in range(6):
        sub = root / "small" / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(50):
            (sub / f"s{i:03d}").write_bytes(os.urandom(rnd.randrange(1, 60_000)))
    (root / "small" / "link").symlink_to("d0/s000")
    return root


def kill_when(src: Path, repo: Path, condition: Callable[[], bool]) -> int:
    """Run an import, ``kill -9`` it as soon as ``condition()`` holds; its exit status."""
    return kill_cafs_when(["import", src, repo, "--name", "ds", "--no-progress"], condition, "the condition")


def packs_at_least(n: int) -> Callable[[Path], Callable[[], bool]]:
    return lambda repo: lambda: len(complete_files(repo, "packs")) >= n


def stored_share(share: float, size: int) -> Callable[[Path], Callable[[], bool]]:
    return lambda repo: lambda: packs_bytes(repo) >= share * size


def index_written(repo: Path) -> Callable[[], bool]:
    # the index object is written right before the journal entry that commits
    return lambda: len(complete_files(repo, "index")) >= 1


def points(size: int) -> dict[str, Callable[[Path], Callable[[], bool]]]:
    return {"after the first pack": packs_at_least(1),
            "halfway": stored_share(0.5, size),
            "near the end": stored_share(0.9, size),
            "before the commit": index_written}


# a kill at these may come too late: the import can finish first
MAY_FINISH = {"near the end", "before the commit"}


def check_after_kill(cafs, repo: Path, src: Path, status: int, tmp_path: Path) -> None:
    entries = journal_entries(repo)
    if status == -signal.SIGKILL:
        assert len(entries) <= 1
    else:
        assert len(entries) == 1  # the import finished before the kill
    if entries:  # the kill came after the commit: the entry is complete and usable
        r = cafs("get", f"{repo}#ds", tmp_path / "committed")
        assert r.code == 0, r.err
        assert_same_tree(src, tmp_path / "committed")
    r = cafs("fsck", repo)
    assert r.code == 0, r.out + r.err


def resume(cafs, repo: Path, src: Path, tmp_path: Path) -> None:
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("get", f"{repo}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(src, tmp_path / "out")
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err


@pytest.mark.parametrize("point", list(points(0)))
def test_kill_then_resume(cafs, repo: Path, src: Path, tmp_path: Path, point: str) -> None:
    status = kill_when(src, repo, points(tree_bytes(src))[point](repo))
    if point not in MAY_FINISH:
        assert status == -signal.SIGKILL  # else the test tested nothing
        assert journal_entries(repo) == []
    check_after_kill(cafs, repo, src, status, tmp_path)
    stored_by_killed = packs_bytes(repo)
    resume(cafs, repo, src, tmp_path)
    size = tree_bytes(src)
    # the killed run's packs are reused: only what it had not stored is stored now
    assert packs_bytes(repo) - stored_by_killed <= max(0, size - stored_by_killed) + PACK_SIZE + SLACK
    assert packs_bytes(repo) <= size + PACK_SIZE + SLACK


def test_repeated_kills_then_resume(cafs, repo: Path, src: Path, tmp_path: Path) -> None:
    stored = []
    for condition in points(tree_bytes(src)).values():
        status = kill_when(src, repo, condition(repo))
        if status == 0:
            break
        stored.append(packs_bytes(repo))
    assert stored == sorted(stored)  # every run went on from where the last one stopped
    check_after_kill(cafs, repo, src, status, tmp_path)
    resume(cafs, repo, src, tmp_path)
    assert packs_bytes(repo) <= tree_bytes(src) + PACK_SIZE + SLACK


def test_stale_lock_of_a_killed_import_does_not_block(cafs, repo: Path, src: Path) -> None:
    assert kill_when(src, repo, packs_at_least(1)(repo)) == -signal.SIGKILL
    assert complete_files(repo, "locks") != []  # the killed import's lock is left behind
    r = cafs("gc", repo, "--dry-run")
    assert r.code == 0, r.err


@pytest.mark.parametrize("pid", [0, 1 << 31, 1 << 40])
def test_a_lock_of_no_possible_process_does_not_block(cafs, repo: Path, src: Path, pid: int) -> None:
    # a lock of this host naming a pid no process can have: os.kill raised OverflowError,
    # a traceback from every import and gc (pid 0 named this process's own group, alive)
    import msgpack

    lock = repo / "locks" / ("ab" * 16)
    lock.parent.mkdir(exist_ok=True)
    lock.write_bytes(msgpack.packb({"v": 1, "kind": "exclusive", "host": os.uname().nodename, "pid": pid,
                                    "time_ns": time.time_ns()}))
    r = cafs("import", src, repo, "--name", "ds", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("gc", repo, "--dry-run")
    assert r.code == 0, r.err


def test_leftover_temporary_files_break_nothing(cafs, repo: Path, src: Path, tmp_path: Path) -> None:
    kill_when(src, repo, stored_share(0.5, tree_bytes(src))(repo))
    pack_dir = next(p for p in (repo / "packs").iterdir() if p.is_dir())
    junk = {pack_dir / f"{TMP_PREFIX}0123456789abcdef": os.urandom(1000),
            repo / "packs" / f"{TMP_PREFIX}feedfacecafebeef": b"",
            repo / "index" / f"{TMP_PREFIX}00ff00ff00ff00ff": b"not an index",
            repo / "refs" / "ds" / f"{TMP_PREFIX}aaaaaaaaaaaaaaaa": b"not a journal entry",
            repo / "locks" / f"{TMP_PREFIX}bbbbbbbbbbbbbbbb": b"not a lock"}
    for path, data in junk.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    resume(cafs, repo, src, tmp_path)
    for args in (("snapshots", repo, "--json"), ("stats", repo, "--json"), ("stats", f"{repo}#ds", "--json"),
                 ("ls", "-R", f"{repo}#ds")):
        r = cafs(*args)
        assert r.code == 0, (args, r.err)
    assert [s["jid"] for s in json.loads(cafs("snapshots", repo, "--json").out)] == [1]

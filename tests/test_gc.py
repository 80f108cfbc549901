"""``cafs forget`` and ``cafs gc``: space comes back, nothing referenced is lost, ever.

Real repositories (``cafs init``/``cafs import``, small chunks and packs) with several
snapshots of a changing tree. The oracles: the bytes under ``packs/`` (they must go down
by about what no remaining snapshot references, computed here independently of
``cafs.gc`` by walking the snapshots), every remaining snapshot extracting byte-exact,
and ``cafs fsck --read-data`` finding nothing, after a clean gc, a gc that raced an
import, a gc killed with ``kill -9`` at random points, and a gc after a killed import.

Processes started here are stopped by pid in ``finally``; waits poll with a deadline.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cafs.cli import main as cafs_main
from cafs.format.nodes import DirIndexNode, FileNode, TreeNode, decode_node
from cafs.format.pack import TAIL_LEN, decode_trailer, trailer_length
from cafs.repository import Repository
from cafs.stores import open_store
from mountfix import mounted
from treegen import all_files, assert_same_tree, make_tree, mutate_tree

INIT_ARGS = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "512K")
# many small packs, so a gc has hundreds of deletions to be killed in the middle of
TINY_INIT_ARGS = ("--chunk-min", "4K", "--chunk-avg", "16K", "--chunk-max", "64K", "--pack-size", "64K")
DEADLINE = 60.0


# -- the repository, seen independently of cafs.gc ---------------------------------------------


def pack_files(repo: Path) -> dict[str, int]:
    """Complete packs (not temporary files of interrupted writes) and their sizes; safe
    to call while a gc deletes packs."""
    out = {}
    for p in (repo / "packs").glob("*/*"):
        if p.name.startswith(".tmp-"):
            continue
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:
            continue  # deleted between the listing and the stat
    return out


def live_ids(repo: Path) -> set[bytes]:
    """Ids of every node and chunk that a snapshot of ``repo`` references."""
    r = Repository.open(open_store(str(repo)))
    live: set[bytes] = set()
    for snap in r.snapshots():
        assert snap.root.ref is not None
        stack = [snap.root.ref]
        while stack:
            loc = stack.pop()
            if loc.id in live:
                continue
            live.add(loc.id)
            node = decode_node(r.read_object(loc))
            if isinstance(node, TreeNode):
                for e in node.entries:
                    live.update(s.id for s in e.spans or ())
                    if e.ref is not None:
                        stack.append(e.ref)
            elif isinstance(node, DirIndexNode):
                stack.extend(p.ref for p in node.pages)
            elif isinstance(node, FileNode):
                live.update(s.id for s in node.spans)
    return live


def dead_bytes(repo: Path) -> int:
    """Stored bytes of objects no snapshot references (each object counted once)."""
    live = live_ids(repo)
    seen: set[bytes] = set()
    dead = 0
    for p in (repo / "packs").glob("*/*"):
        if p.name.startswith(".tmp-"):
            continue
        data = p.read_bytes()
        n = trailer_length(data[-TAIL_LEN:], str(p))
        trailer = decode_trailer(data[len(data) - TAIL_LEN - n:len(data) - TAIL_LEN], bytes.fromhex(p.name),
                                 len(data), str(p))
        for loc in trailer.entries:
            if loc.id not in live and loc.id not in seen:
                dead += loc.stored_length
            seen.add(loc.id)
    return dead


def parse_human(text: str) -> float:
    number, unit = text.split()
    return float(number) * 1024 ** ("B", "KiB", "MiB", "GiB", "TiB").index(unit)


# -- commands --------------------------------------------------------------------------------


def run(*args: str | os.PathLike[str]) -> None:
    assert cafs_main([os.fspath(a) for a in args]) == 0, args


def assert_fsck_clean(cafs, repo: Path) -> None:
    r = cafs("fsck", repo, "--read-data")
    assert r.code == 0, r.out + r.err


def assert_extracts(cafs, snapshot: str, src: Path, dest: Path) -> None:
    r = cafs("get", snapshot, dest)
    assert r.code == 0, r.err
    assert_same_tree(src, dest)


def cafs_popen(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cafs.cli", *map(os.fspath, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def started(*args: str | os.PathLike[str]) -> Iterator[subprocess.Popen[str]]:
    """``cafs ARGS`` as a subprocess, killed by pid on the way out if still running."""
    proc = cafs_popen(*args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=DEADLINE)


def poll(condition: Callable[[], object], what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Wait until ``condition()`` holds (and ``proc``, if given, is still running)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {err}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def locks(repo: Path) -> list[Path]:
    d = repo / "locks"
    return [p for p in d.iterdir() if not p.name.startswith(".tmp-")] if d.exists() else []


# -- a repository with history ----------------------------------------------------------------


@dataclass(frozen=True)
class History:
    repo: Path
    srcs: tuple[Path, Path, Path]  # the trees of ds@1, ds@2, ds@3


def _next_tree(prev: Path, dest: Path, seed: int) -> Path:
    shutil.copytree(prev, dest, symlinks=True)
    rnd = random.Random(seed)
    big = dest / "data" / "big"
    big.unlink(missing_ok=True)
    big.write_bytes(rnd.randbytes(2 << 20))  # 2 MiB that only this snapshot has
    (dest / "data" / f"only-{seed}").write_bytes(rnd.randbytes(100 << 10))
    return dest


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    base = tmp_path_factory.mktemp("history")
    a = make_tree(base / "a", seed=21, big_file_size=2 << 20)
    b = _next_tree(a, base / "b", 22)
    mutate_tree(b, seed=3)
    c = _next_tree(b, base / "c", 23)
    repo = base / "repo"
    run("init", repo, *INIT_ARGS)
    for src in (a, b, c):
        run("import", src, repo, "--name", "ds", "--cache", base / "cache", "--no-progress")
    return History(repo, (a, b, c))


@pytest.fixture
def hist(history: History, tmp_path: Path) -> History:
    """A private copy of the repository with history."""
    repo = tmp_path / "repo"
    subprocess.run(["cp", "-a", history.repo, repo], check=True)
    return History(repo, history.srcs)


def _gc_reclaims(cafs, hist: History, tmp_path: Path, forget_args: tuple[str, ...],
                 kept: dict[int, Path]) -> None:
    r = cafs("forget", hist.repo, "ds", *forget_args)
    assert r.code == 0, r.err
    assert sorted(int(p.name) for p in (hist.repo / "refs" / "ds").iterdir() if p.name.isdigit()) == sorted(kept)
    dead = dead_bytes(hist.repo)
    assert dead > 2 << 20, "forgetting must leave something to reclaim"
    before = sum(pack_files(hist.repo).values())
    r = cafs("gc", hist.repo)
    assert r.code == 0, r.err
    after = sum(pack_files(hist.repo).values())
    # Packs mostly live keep their dead objects; the others go or are repacked
    # (pack trailers and the repacked live objects' new trailers are the slack).
    assert 0.75 * dead <= before - after <= dead + 64 * 1024, (dead, before - after)
    m = re.search(r"; ([\d.]+ \w+) reclaimed", r.out)
    assert m, r.out
    assert parse_human(m.group(1)) == pytest.approx(before - after, rel=0.01)
    assert dead_bytes(hist.repo) < 0.25 * dead
    assert_fsck_clean(cafs, hist.repo)
    for jid, src in kept.items():
        assert_extracts(cafs, f"{hist.repo}#ds@{jid}", src, tmp_path / f"out{jid}")


def test_gc_after_forget_keep_last(cafs, hist: History, tmp_path: Path) -> None:
    _gc_reclaims(cafs, hist, tmp_path, ("--keep-last", "1"), {3: hist.srcs[2]})


def test_gc_after_forget_by_jid(cafs, hist: History, tmp_path: Path) -> None:
    _gc_reclaims(cafs, hist, tmp_path, ("--jid", "2"), {1: hist.srcs[0], 3: hist.srcs[2]})


def test_gc_dry_run_deletes_nothing(cafs, hist: History) -> None:
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    before = all_files(hist.repo)
    r = cafs("gc", hist.repo, "--dry-run")
    assert r.code == 0, r.err
    assert "would delete" in r.out and "reclaimable" in r.out
    m = re.search(r"would delete (\d+) unreferenced", r.out)
    assert m and int(m.group(1)) > 0, r.out
    assert all_files(hist.repo) == before


def test_gc_with_nothing_to_reclaim_changes_nothing(cafs, hist: History) -> None:
    before = all_files(hist.repo)
    r = cafs("gc", hist.repo)
    assert r.code == 0, r.err
    assert all_files(hist.repo) == before


def test_gc_deletes_nothing_while_a_snapshot_cannot_be_read(cafs, hist: History) -> None:
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    r = Repository.open(open_store(str(hist.repo)))
    root = r.snapshot("ds").root.ref
    assert root is not None
    meta = hist.repo / "packs" / root.pack.hex()[:2] / root.pack.hex()
    meta.unlink()  # every other pack now looks unreferenced
    before = all_files(hist.repo)
    r2 = cafs("gc", hist.repo)
    assert r2.code != 0
    assert "ds@3 cannot be read" in r2.err and "fsck" in r2.err, r2.err
    assert all_files(hist.repo) == before

# root without the capabilities that let it read any directory: chmod 000 then bites
WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
               "--inh-caps=-dac_override,-dac_read_search")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_gc_deletes_nothing_when_a_ref_cannot_be_listed(hist: History) -> None:
    ref_dir = hist.repo / "refs" / "ds"
    before = all_files(hist.repo)
    ref_dir.chmod(0)
    try:
        runs = {cmd: subprocess.run([*WITHOUT_DAC, sys.executable, "-m", "cafs.cli", cmd, str(hist.repo)],
                                    capture_output=True, text=True, timeout=120)
                for cmd in ("gc", "snapshots")}
    finally:
        ref_dir.chmod(0o755)
    for cmd, r in runs.items():
        assert r.returncode != 0, f"{cmd}: {r.stdout}"
        assert "refs/" in r.stderr and "Permission denied" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert all_files(hist.repo) == before



@pytest.mark.parametrize("args, code", [(("--jid", "3"), 1), (("--jid", "1", "--jid", "3"), 1),
                                        (("--keep-last", "0"), 2), (("--keep-last", "-1"), 2)])
def test_forget_refuses_the_newest(cafs, hist: History, args: tuple[str, ...], code: int) -> None:
    """Forgetting the newest by jid is refused (exit 1); --keep-last below 1 is bad usage (2)."""
    before = all_files(hist.repo)
    r = cafs("forget", hist.repo, "ds", *args)
    assert r.code == code, r.err
    assert "newest" in r.err and "Traceback" not in r.err, r.err
    assert all_files(hist.repo) == before


@pytest.mark.parametrize("jid", ["0", "-1"])
def test_forget_of_a_jid_below_1_is_a_usage_error(cafs, hist: History, jid: str) -> None:
    before = all_files(hist.repo)  # exit 1, "no snapshot [-1]", as if the journal lacked it
    r = cafs("forget", hist.repo, "ds", "--jid", jid)
    assert r.code == 2 and f"--jid {jid}" in r.err and len(r.err.splitlines()) == 1, r.err
    assert all_files(hist.repo) == before


# -- locks ----------------------------------------------------------------------------------


@pytest.fixture
def endless_tree(tmp_path: Path) -> Path:
    """A tree whose import runs for minutes: one sparse file of 64 GiB."""
    src = tmp_path / "endless"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.truncate(64 << 30)
    return src


def test_gc_refused_while_an_import_runs(cafs, hist: History, endless_tree: Path) -> None:
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    before = pack_files(hist.repo)
    with started("import", endless_tree, hist.repo, "--name", "endless", "--no-progress") as imp:
        poll(lambda: locks(hist.repo), "the import's lock", imp)
        r = cafs("gc", hist.repo)
        assert imp.poll() is None, "the import ended: the test proves nothing"
    assert r.code != 0
    assert "in use" in r.err and "shared lock" in r.err, r.err
    assert set(pack_files(hist.repo)) >= set(before)


def test_gc_dry_run_runs_beside_an_import(cafs, hist: History, endless_tree: Path) -> None:
    """A dry run writes nothing: it may run while an import holds its shared lock (as
    restic's prune --dry-run may), and leaves the import running and the packs as they were."""
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    before = pack_files(hist.repo)
    with started("import", endless_tree, hist.repo, "--name", "endless", "--no-progress") as imp:
        poll(lambda: locks(hist.repo), "the import's lock", imp)
        r = cafs("gc", hist.repo, "--dry-run")
        assert imp.poll() is None, "the import ended: the test proves nothing"
        assert len(locks(hist.repo)) == 1, "the dry run left its lock behind"
    assert r.code == 0, r.err
    assert "would delete" in r.out and "would delete 0 " not in r.out, r.out
    assert set(pack_files(hist.repo)) >= set(before)


def test_stale_lock_of_a_killed_import_does_not_block_gc(cafs, hist: History, endless_tree: Path,
                                                         tmp_path: Path) -> None:
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    with started("import", endless_tree, hist.repo, "--name", "endless", "--no-progress") as imp:
        poll(lambda: locks(hist.repo), "the import's lock", imp)
        os.kill(imp.pid, signal.SIGKILL)
        imp.wait(timeout=DEADLINE)
    assert len(locks(hist.repo)) == 1
    r = cafs("gc", hist.repo)
    assert r.code == 0, r.err
    assert locks(hist.repo) == []
    assert_fsck_clean(cafs, hist.repo)
    assert_extracts(cafs, f"{hist.repo}#ds", hist.srcs[2], tmp_path / "out")


def test_gc_removes_stale_temporary_files_only(cafs, hist: History) -> None:
    """What a writer killed mid-pack leaves (``.tmp-*``) goes once it is an hour old; a
    fresh one may be a live writer's and stays."""
    shard = next((hist.repo / "packs").iterdir())
    stale, fresh = shard / ".tmp-0123456789abcdef", shard / ".tmp-fedcba9876543210"
    stale.write_bytes(b"x" * 5000)
    fresh.write_bytes(b"y" * 100)
    hour_ago = time.time() - 3700
    os.utime(stale, (hour_ago, hour_ago))
    packs = pack_files(hist.repo)
    assert cafs("gc", hist.repo, "--dry-run").code == 0
    assert stale.exists()
    r = cafs("gc", hist.repo)
    assert r.code == 0, r.err
    assert "removed 1 temporary file(s)" in r.out, r.out
    assert not stale.exists() and fresh.exists()
    assert pack_files(hist.repo) == packs


def _race_once(cafs, repo: Path, srcs: tuple[Path, Path, Path], rnd: random.Random, out: Path) -> str:
    """gc and an import started at nearly the same time, in a random order; then check
    that nothing was lost. ds@1's tree is garbage and the import brings it back,
    deduplicating against exactly the packs gc wants to delete."""
    again = srcs[0]
    cmds = [["gc", repo], ["import", again, repo, "--name", "again", "--no-progress"]]
    rnd.shuffle(cmds)
    with started(*cmds[0]) as p1:
        try:
            p1.wait(timeout=rnd.uniform(0, 0.05))
        except subprocess.TimeoutExpired:
            pass
        with started(*cmds[1]) as p2:
            out2, err2 = p2.communicate(timeout=DEADLINE)
        out1, err1 = p1.communicate(timeout=DEADLINE)
    results = {cmds[0][0]: (p1.returncode, err1), cmds[1][0]: (p2.returncode, err2)}
    for code, err in results.values():
        assert code in (0, 1), err
        if code:
            assert "in use" in err, err
    assert_fsck_clean(cafs, repo)
    if results["import"][0]:
        r = cafs("import", again, repo, "--name", "again")
        assert r.code == 0, r.err
    assert_extracts(cafs, f"{repo}#again", again, out / "again")
    assert_extracts(cafs, f"{repo}#ds", srcs[2], out / "ds")
    r = cafs("gc", repo)
    assert r.code == 0, r.err
    assert_fsck_clean(cafs, repo)
    assert_extracts(cafs, f"{repo}#again", again, out / "again-after-gc")
    return f"{cmds[0][0]} first: gc exit {results['gc'][0]}, import exit {results['import'][0]}"


def test_gc_racing_an_import_loses_nothing(cafs, history: History, tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rnd = random.Random(seed)
    log: list[str] = []
    for n in range(6):
        repo = tmp_path / f"repo{n}"
        subprocess.run(["cp", "-a", history.repo, repo], check=True)
        assert cafs("forget", repo, "ds", "--keep-last", "1").code == 0
        (tmp_path / f"out{n}").mkdir()
        try:
            log.append(_race_once(cafs, repo, history.srcs, rnd, tmp_path / f"out{n}"))
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, round {n}, after {log}: {exc}") from None


# -- kill -9 ----------------------------------------------------------------------------------


@pytest.fixture
def many_dead_packs(tmp_path: Path, cafs) -> tuple[Path, Path]:
    """A repository with 200+ unreferenced small packs, and the tree of its snapshot."""
    rnd = random.Random(5)
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "x").write_bytes(rnd.randbytes(15 << 20))
    shared = rnd.randbytes(300 << 10)
    (old / "y").write_bytes(shared)
    (new / "y").write_bytes(shared)  # lives on in packs shared with dead chunks: repacked
    (new / "z").write_bytes(rnd.randbytes(100 << 10))
    repo = tmp_path / "repo"
    assert cafs("init", repo, *TINY_INIT_ARGS).code == 0
    assert cafs("import", old, repo, "--name", "ds").code == 0
    assert cafs("import", new, repo, "--name", "ds").code == 0
    assert cafs("forget", repo, "ds", "--keep-last", "1").code == 0
    assert len(pack_files(repo)) >= 200
    return repo, new


def _kill_gc_once(repo: Path, rnd: random.Random, duration: float) -> str:
    """Start gc and kill -9 it at a random point (``duration``: how long a whole gc
    takes); says where it was killed."""
    indexes = set(os.listdir(repo / "index"))
    packs = len(pack_files(repo))
    how = rnd.choice(["delay", "delay", "index-written", "packs-deleted"])
    with started("gc", repo) as gc:
        if how == "delay":
            try:
                # the first fifth is Python starting; past 0.6 a gc that runs faster than
                # the calibrating one (warm caches) had often finished: 1 kill in 8 tries
                gc.wait(timeout=rnd.uniform(0.2, 0.6) * duration)
            except subprocess.TimeoutExpired:
                pass
        elif how == "index-written":
            poll(lambda: set(os.listdir(repo / "index")) != indexes or gc.poll() is not None, "a new index")
        else:
            k = rnd.randrange(1, max(2, packs // 2))
            poll(lambda: len(pack_files(repo)) <= packs - k or gc.poll() is not None, f"{k} deletions")
        if gc.poll() is None:
            os.kill(gc.pid, signal.SIGKILL)
        gc.wait(timeout=DEADLINE)
        return f"{how}: exit {gc.returncode}, {packs} -> {len(pack_files(repo))} packs"


def test_gc_killed_at_random_points(cafs, many_dead_packs: tuple[Path, Path], tmp_path: Path) -> None:
    template, src = many_dead_packs
    calibrate = tmp_path / "calibrate"
    subprocess.run(["cp", "-a", template, calibrate], check=True)
    t0 = time.monotonic()
    with started("gc", calibrate) as gc:
        gc.wait(timeout=DEADLINE)
    duration = time.monotonic() - t0
    seed = int.from_bytes(os.urandom(4), "big")
    rnd = random.Random(seed)
    log: list[str] = []
    for n in range(4):
        repo = tmp_path / f"repo{n}"
        subprocess.run(["cp", "-a", template, repo], check=True)
        for _ in range(2):  # killed, and killed again while finishing the first one's work
            log.append(_kill_gc_once(repo, rnd, duration))
            r = cafs("fsck", repo, "--read-data")
            assert r.code == 0, f"seed {seed}, {log}:\n{r.out}{r.err}"
        r = cafs("gc", repo)
        assert r.code == 0, f"seed {seed}, {log}: {r.err}"
        assert len(pack_files(repo)) < 20, f"seed {seed}, {log}"
        assert dead_bytes(repo) < 128 << 10
        assert_fsck_clean(cafs, repo)
        assert_extracts(cafs, f"{repo}#ds", src, tmp_path / f"out{n}")
    assert sum(f"exit {-signal.SIGKILL}" in line for line in log) >= 2, f"seed {seed}: gc was hardly killed: {log}"


@pytest.mark.parametrize("forget_args", [("--keep-last", "1"), ("--jid", "2")])
def test_a_second_gc_changes_nothing(cafs, hist: History, forget_args: tuple[str, ...]) -> None:
    # What a gc leaves has no garbage: a second gc finds nothing to repack. (A small
    # repacked pack, such as one holding an empty directory's 3-byte node, is mostly
    # trailer; counting the trailer as garbage repacked it again on every gc.)
    assert cafs("forget", hist.repo, "ds", *forget_args).code == 0
    assert cafs("gc", hist.repo).code == 0
    before = all_files(hist.repo)
    r = cafs("gc", hist.repo)
    assert r.code == 0, r.err
    assert "deleted 0 unreferenced pack(s), repacked 0; 0 B reclaimed" in r.out, r.out
    assert all_files(hist.repo) == before


def test_a_chunk_stored_in_two_forms_stays_readable_after_gc(cafs, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts that compress a chunk differently (another zstd version or level) store it in
    two forms; a copy brings both into one repository. gc keeps an object once, in either
    form: a snapshot that names the form gc dropped still reads it, from the other."""
    from cafs.format.location import CODEC_RAW
    text = b"".join(b"line %d of a file that compresses well\n" % i for i in range(3000))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_bytes(text)
    (b / "x").write_bytes(text)
    (b / "g").write_bytes(os.urandom(1 << 20))
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    for repo in (r1, r2):
        assert cafs("init", repo).code == 0
    with monkeypatch.context() as m:
        m.setattr("cafs.codec.Compressor.encode", lambda self, data: (CODEC_RAW, data))
        assert cafs("import", a, r1, "--name", "a", "--no-progress").code == 0  # x stored raw
    assert cafs("import", b, r2, "--name", "b", "--no-progress").code == 0  # x with zstd, beside g
    (b / "g").unlink()
    assert cafs("import", b, r2, "--name", "b", "--no-progress").code == 0  # b@2: x alone, same pack
    r = cafs("copy", f"{r2}#b@2", r1, "--no-progress")
    assert r.code == 0, r.err
    r = cafs("gc", r1)  # the copied pack is mostly g, garbage in r1: repacked, and x is in r1 already
    assert r.code == 0, r.err
    r = cafs("fsck", r1, "--read-data")
    assert r.code == 0, r.out + r.err
    r = cafs("get", f"{r1}#b", tmp_path / "out")
    assert r.code == 0, r.err
    assert (tmp_path / "out" / "x").read_bytes() == text
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{r1}#b", mnt, f"cache={tmp_path / 'mount-cache'},cache_mode=full") as m:
        assert (mnt / "x").read_bytes() == text
        poll(lambda: m.stats()["cache_writes_pending"] == 0, "the cache writes")
        assert m.stats()["cache_size"] == 0  # stored bytes of another form than the node names: not kept


def test_a_lock_gc_cannot_read_stops_it(cafs, hist: History, nginx_server, fault_proxy,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An import's lock that the server fails to hand out (500 until the deadline) is not
    taken for no lock: gc cannot tell that nobody writes, so it deletes nothing."""
    from cafs.locks import locked

    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    server = nginx_server(hist.repo.parent)
    proxy = fault_proxy(server)
    before = pack_files(hist.repo)
    monkeypatch.setenv("CAFS_TIMEOUT", "1")
    with locked(open_store(f"{server.url}/repo"), "shared"):  # an import at work
        proxy.set_mode("status", status=500, method="GET", match=r"/locks/.")
        r = cafs("gc", f"{proxy.url}/repo")
    assert r.code == 1, r.out
    assert "locks/" in r.err and "500" in r.err and "Traceback" not in r.err, r.err
    assert pack_files(hist.repo) == before
    assert locks(hist.repo) == []


@pytest.mark.parametrize("mirror", ["down", "damaged"])
def test_what_gc_moved_is_read_though_a_mirror_fails(cafs, hist: History, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, mirror: str) -> None:
    """The repository lacks a pack gc repacked, and its mirror cannot give it: down, or
    holding it truncated (copied before the gc). The object is found by id in the
    repository at once; before, the read waited out the deadline for the mirror, or
    took the mirror's damage for the answer, and failed (get: exit 1; a mount: EIO)."""
    monkeypatch.setenv("CAFS_TIMEOUT", "5")  # the old code failed after this
    copy = tmp_path / "mirror"
    shutil.copytree(hist.repo, copy)
    assert cafs("forget", hist.repo, "ds", "--keep-last", "1").code == 0
    r = cafs("gc", hist.repo)
    assert r.code == 0 and "repacked 0;" not in r.out, r.out
    gone = set(pack_files(copy)) - set(pack_files(hist.repo))
    for pack in (copy / "packs").glob("*/*"):
        if pack.name in gone:
            os.truncate(pack, pack.stat().st_size // 2)
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{refusing.getsockname()[1]}/mirror" if mirror == "down" else str(copy)
        r = cafs("get", f"{hist.repo}#ds", tmp_path / "out", "--mirror", url)
        assert r.code == 0, r.err
        assert_same_tree(hist.srcs[2], tmp_path / "out")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with mounted(f"{hist.repo}#ds", mnt, f"cache={tmp_path / 'cache'},mirror={url},timeout=5",
                     expect_warnings=True):
            assert_same_tree(hist.srcs[2], mnt)

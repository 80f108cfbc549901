"""``cafs fsck``: every fault is found, named by what it affects, and repaired from a mirror.

Each test damages a copy of one real repository (made once per module with ``cafs init``
and ``cafs import``, small chunks and packs so a small tree spans many packs) the way a
disk or a person would: flipped bytes in a data pack, a truncated or missing pack, a
corrupt node, a missing root, a damaged index object, garbage in a journal entry. The
oracles are fsck(8)'s exit codes (0 clean, 1 corrected, 4 left uncorrected, 8
operational), the affected snapshot and paths fsck names (computed independently here by
walking the snapshot), and the source tree, which ``cafs get`` must reproduce exactly
after a repair. The cache tests damage a host's chunk cache and its LMDB, under fsck and
under a running mount (which must never serve a wrong byte).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FunctionType, ModuleType

import pytest

from cafs import cachecheck, metacache
from cafs.check import Checker
from cafs.cli import main as cafs_main
from cafs.format.location import Location
from cafs.format.nodes import DirIndexNode, Entry, FileNode, TreeNode, decode_node
from cafs.format.pack import KIND_DATA, KIND_META, TAIL_LEN, decode_trailer, trailer_length
from cafs.repository import Repository
from cafs.stores import open_store
from mountfix import run_cafs
from treegen import assert_same_tree, make_tree

INIT_ARGS = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "512K")
FSCK_CLEAN, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_OPERATIONAL = 0, 1, 4, 8
LABEL = "ds@1"
MOUNT_TIMEOUT = 60.0


# -- a repository's layout, computed independently of cafs.check ----------------------


@dataclass
class Layout:
    """What the repository holds and which snapshot paths use what."""

    repo_id: str
    kinds: dict[bytes, int] = field(default_factory=dict)  # pack id -> KIND_DATA / KIND_META
    entries: dict[bytes, tuple[Location, ...]] = field(default_factory=dict)  # pack id -> trailer
    files: dict[bytes, tuple[Location, ...]] = field(default_factory=dict)  # file path -> spans
    dirs: dict[bytes, Location] = field(default_factory=dict)  # directory path -> its node
    root: Location | None = None

    def pack_users(self, pack: bytes) -> set[bytes]:
        return {path for path, spans in self.files.items() if any(s.pack == pack for s in spans)}

    def chunk_users(self, chunk: bytes) -> set[bytes]:
        return {path for path, spans in self.files.items() if any(s.id == chunk for s in spans)}


def show(path: bytes) -> str:
    """A snapshot path as fsck shows it."""
    return path.decode("utf-8", "backslashreplace") or "/"


def pack_path(repo: Path, pack: bytes) -> Path:
    return repo / "packs" / pack.hex()[:2] / pack.hex()


def read_layout(repo: Path, ref: str = "ds") -> Layout:
    r = Repository.open(open_store(str(repo)))
    out = Layout(r.config.repo_id)
    for p in (repo / "packs").glob("*/*"):
        if p.name.startswith(".tmp"):
            continue
        data = p.read_bytes()
        n = trailer_length(data[-TAIL_LEN:], str(p))
        t = decode_trailer(data[len(data) - TAIL_LEN - n:len(data) - TAIL_LEN], bytes.fromhex(p.name), len(data),
                           str(p))
        out.kinds[bytes.fromhex(p.name)] = t.kind
        out.entries[bytes.fromhex(p.name)] = t.entries
    snap = r.snapshot(ref)
    out.root = snap.root.ref
    stack: list[tuple[bytes, Entry]] = [(b"", snap.root)]
    while stack:
        path, e = stack.pop()
        if e.is_dir:
            assert e.ref is not None
            out.dirs[path] = e.ref
            node = decode_node(r.read_object(e.ref))
            children: list[Entry] = []
            if isinstance(node, TreeNode):
                children = list(node.entries)
            elif isinstance(node, DirIndexNode):
                for page in node.pages:
                    sub = decode_node(r.read_object(page.ref))
                    assert isinstance(sub, TreeNode)
                    children.extend(sub.entries)
            stack.extend((path + b"/" + c.name if path else c.name, c) for c in children)
        elif e.is_file:
            if e.spans is not None:
                out.files[path] = e.spans
            else:
                assert e.ref is not None
                node = decode_node(r.read_object(e.ref))
                assert isinstance(node, FileNode)
                out.files[path] = node.spans
    return out


def flip(path: Path, offset: int, count: int = 1) -> None:
    """Invert ``count`` bytes of ``path`` at ``offset``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(count)
        assert len(old) == count
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}


# -- the repository every fault test damages a copy of -------------------------------------


@dataclass(frozen=True)
class Pristine:
    src: Path
    repo: Path
    layout: Layout


def _run(*args: str | os.PathLike[str]) -> None:
    assert cafs_main([os.fspath(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    base = tmp_path_factory.mktemp("pristine")
    src = make_tree(base / "src", seed=5, big_file_size=3 << 20)
    repo = base / "repo"
    _run("init", repo, *INIT_ARGS)
    _run("import", src, repo, "--name", "ds", "--cache", base / "cache", "--no-progress")
    layout = read_layout(repo)
    assert sum(k == KIND_DATA for k in layout.kinds.values()) >= 6, "too few data packs to be interesting"
    return Pristine(src, repo, layout)


@dataclass(frozen=True)
class Damaged:
    repo: Path
    mirror: Path  # a cp -a of the repository taken before the damage
    src: Path
    layout: Layout


@pytest.fixture
def copies(pristine: Pristine, tmp_path: Path) -> Damaged:
    repo, mirror = tmp_path / "repo", tmp_path / "mirror"
    subprocess.run(["cp", "-a", pristine.repo, repo], check=True)
    subprocess.run(["cp", "-a", repo, mirror], check=True)
    return Damaged(repo, mirror, pristine.src, pristine.layout)


# -- the faults ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str  # the problem kind fsck reports
    subject: str  # the damaged object as fsck names it
    read_data: bool  # only found when chunk bytes are read
    affected: set[str]  # paths fsck may name (as fsck shows them); it must name one of them


def _big_pack(layout: Layout) -> tuple[bytes, Location]:
    """A data pack in the middle of data/big and a chunk of data/big in it."""
    spans = layout.files[b"data/big"]
    span = spans[len(spans) // 2]
    assert layout.kinds[span.pack] == KIND_DATA
    return span.pack, span


def flipped_data(d: Damaged) -> Fault:
    pack, span = _big_pack(d.layout)
    flip(pack_path(d.repo, pack), span.offset + span.stored_length // 2, 4)
    return Fault("corrupt-pack", pack.hex(), True, {show(p) for p in d.layout.chunk_users(span.id)})


def truncated_pack(d: Damaged) -> Fault:
    pack, _ = _big_pack(d.layout)
    path = pack_path(d.repo, pack)
    os.truncate(path, path.stat().st_size // 2)
    return Fault("truncated-pack", pack.hex(), False, {show(p) for p in d.layout.pack_users(pack)})


def missing_pack(d: Damaged) -> Fault:
    pack, _ = _big_pack(d.layout)
    pack_path(d.repo, pack).unlink()
    return Fault("missing-pack", pack.hex(), False, {show(p) for p in d.layout.pack_users(pack)})


def corrupt_node(d: Damaged) -> Fault:
    loc = d.layout.dirs[b"data/sub"]
    assert d.layout.kinds[loc.pack] == KIND_META
    flip(pack_path(d.repo, loc.pack), loc.offset + loc.stored_length // 2)
    return Fault("corrupt-node", loc.id.hex(), False, {"data/sub (and everything below)"})


def missing_root(d: Damaged) -> Fault:
    root = d.layout.root
    assert root is not None and d.layout.kinds[root.pack] == KIND_META
    pack_path(d.repo, root.pack).unlink()
    return Fault("missing-pack", root.pack.hex(), False, {"/ (and everything below)"})


def journal_garbage(d: Damaged) -> Fault:
    key = f"refs/ds/{1:020d}"
    data = (d.repo / key).read_bytes()
    (d.repo / key).write_bytes(b"\xc1garbage" + data[8:])  # 0xc1 is never valid msgpack
    return Fault("bad-journal", key, False, {"/ (the whole snapshot)"})


PACK_FAULTS: dict[str, Callable[[Damaged], Fault]] = {
    "flipped-data": flipped_data,
    "truncated-pack": truncated_pack,
    "missing-pack": missing_pack,
    "corrupt-node": corrupt_node,
    "missing-root": missing_root,
}
ALL_FAULTS = {**PACK_FAULTS, "journal-garbage": journal_garbage}


def fsck(cafs, repo: Path, *args: str | os.PathLike[str]):
    return cafs("fsck", repo, *args)


def fsck_json(cafs, repo: Path, *args: str | os.PathLike[str]) -> tuple[int, dict]:
    r = cafs("fsck", repo, "--json", *args)
    return r.code, json.loads(r.out)


def assert_extracts(cafs, repo: Path, src: Path, dest: Path) -> None:
    r = cafs("get", f"{repo}#ds", dest)
    assert r.code == 0, r.err
    assert_same_tree(src, dest)


# -- repository faults ------------------------------------------------------------------------


def test_clean_repository_passes(cafs, copies: Damaged) -> None:
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_CLEAN, r.out + r.err
    assert "no errors" in r.out


@pytest.mark.parametrize("name", ALL_FAULTS)
def test_fault_is_found_and_named(cafs, copies: Damaged, name: str) -> None:
    fault = ALL_FAULTS[name](copies)
    read = ("--read-data",) if fault.read_data else ()
    r = fsck(cafs, copies.repo, *read)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert fault.kind in r.out and LABEL in r.out, r.out
    code, doc = fsck_json(cafs, copies.repo, *read)
    assert code == FSCK_UNCORRECTED
    found = [p for p in doc["problems"] if p["kind"] == fault.kind]
    assert found, doc["problems"]
    assert {p["subject"] for p in found} == {fault.subject}
    assert fault.subject in r.out
    named = {path for p in found for path in p["affects"].get(LABEL, [])}
    assert named, f"{fault.kind} names no path of {LABEL}: {found}"
    assert named <= fault.affected, named - fault.affected
    assert any(path in r.out for path in named), r.out


def test_flipped_data_bytes_need_read_data(cafs, copies: Damaged) -> None:
    flipped_data(copies)
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_CLEAN, r.out
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_UNCORRECTED, r.out


@pytest.mark.parametrize("name", ALL_FAULTS)
def test_repair_from_mirror(cafs, copies: Damaged, name: str, tmp_path: Path) -> None:
    fault = ALL_FAULTS[name](copies)
    read = ("--read-data",) if fault.read_data else ()
    r = fsck(cafs, copies.repo, *read, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert "repaired:" in r.out
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_CLEAN, r.out + r.err
    assert_extracts(cafs, copies.repo, copies.src, tmp_path / "out")


@pytest.mark.parametrize("name", ALL_FAULTS)
def test_repair_without_mirror_changes_nothing(cafs, copies: Damaged, name: str) -> None:
    fault = ALL_FAULTS[name](copies)
    read = ("--read-data",) if fault.read_data else ()
    before = files_under(copies.repo / "packs")
    r = fsck(cafs, copies.repo, *read, "--repair")
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert "not repaired:" in r.out
    assert files_under(copies.repo / "packs") == before
    r = fsck(cafs, copies.repo, *read)
    assert r.code == FSCK_UNCORRECTED


@pytest.mark.parametrize("name", [n for n in PACK_FAULTS if n != "missing-root"])
def test_salvage_then_reread_import_heals_without_a_mirror(cafs, copies: Damaged, name: str, tmp_path: Path) -> None:
    # No copy anywhere: --salvage keeps what is intact and sets the pack aside, so that
    # the lost objects are in no index and a re-import of the same data stores them
    # again; the old snapshot then reads whole (its spans still name the old pack).
    # (A lost root is not healed so: its children are stored again elsewhere, so the
    # new root is another node. The re-import is whole; the old snapshot stays damaged.)
    fault = PACK_FAULTS[name](copies)
    read = ("--read-data",) if fault.read_data else ()
    damaged = copies.repo / "packs" / fault.subject[:2] / fault.subject
    before = damaged.read_bytes() if damaged.exists() else None
    r = fsck(cafs, copies.repo, *read, "--repair", "--salvage")
    assert r.code == FSCK_UNCORRECTED, r.out + r.err  # the lost objects are still lost
    if before is not None:
        assert "set aside" in r.out, r.out
        assert not damaged.exists()
        assert (copies.repo / "damaged" / fault.subject).read_bytes() == before  # kept whole
        assert "import --reread" in fsck(cafs, copies.repo).out
    else:
        assert "import --reread" in r.out, r.out
    r = cafs("import", copies.src, copies.repo, "--name", "ds", "--reread", "--no-progress")
    assert r.code == 0, r.err
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_CLEAN, r.out + r.err
    r = cafs("get", f"{copies.repo}#ds@1", tmp_path / "old")
    assert r.code == 0, r.err
    assert_same_tree(copies.src, tmp_path / "old")


def test_one_damaged_journal_entry_hides_no_other_snapshot(cafs, copies: Damaged) -> None:
    assert cafs("import", copies.src, copies.repo, "--name", "ds", "--no-progress").code == 0  # ds@2
    journal_garbage(copies)  # ds@1
    r = cafs("snapshots", copies.repo)
    assert r.code == 1, r.out + r.err
    assert re.search(r"^ds +2 ", r.out, re.M) and not re.search(r"^ds +1 ", r.out, re.M), r.out
    assert "ds@1" in r.err and "fsck --repair" in r.err, r.err
    r = cafs("snapshots", copies.repo, "--json")
    assert r.code == 1 and [(s["ref"], s["jid"]) for s in json.loads(r.out)] == [("ds", 2)]
    r = cafs("stats", copies.repo, "--json")
    assert r.code == 1 and json.loads(r.out)["snapshots"] == 1, r.out + r.err
    assert "ds@1" in r.err


def test_salvage_needs_repair(cafs, copies: Damaged) -> None:
    r = fsck(cafs, copies.repo, "--salvage")
    assert r.code == 2 and "--repair" in r.err, r.out + r.err


def test_a_mirror_without_repair_is_said_to_be_unused(cafs, copies: Damaged) -> None:
    # it was accepted and never read, without a word: a check that looked like one healing from the mirror
    r = fsck(cafs, copies.repo, "--mirror", copies.mirror)
    assert r.code == 0, r.out + r.err
    assert "--mirror is read by --repair only" in r.err, r.err


def test_repair_skips_a_damaged_mirror_copy(cafs, copies: Damaged) -> None:
    fault = truncated_pack(copies)
    flip(pack_path(copies.mirror, bytes.fromhex(fault.subject)), 100)  # the mirror's copy is bad too
    before = files_under(copies.repo / "packs")
    r = fsck(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_UNCORRECTED, r.out
    assert files_under(copies.repo / "packs") == before


def test_damaged_index_is_rewritten_without_a_mirror(cafs, copies: Damaged, tmp_path: Path) -> None:
    (index,) = (copies.repo / "index").iterdir()
    flip(index, index.stat().st_size // 2)
    packs = files_under(copies.repo / "packs")
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED, r.out
    assert "bad-index" in r.out and index.name in r.out
    r = fsck(cafs, copies.repo, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert files_under(copies.repo / "packs") == packs
    assert not index.exists() and len(list((copies.repo / "index").iterdir())) == 1
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_CLEAN, r.out
    assert_extracts(cafs, copies.repo, copies.src, tmp_path / "out")


def test_json_lists_the_problems(cafs, copies: Damaged) -> None:
    fault = missing_pack(copies)
    code, doc = fsck_json(cafs, copies.repo)
    assert code == doc["exit"] == FSCK_UNCORRECTED
    assert doc["snapshots"] == 1 and doc["packs"] == len(copies.layout.kinds) - 1
    (problem,) = doc["problems"]
    assert problem["kind"] == "missing-pack" and problem["subject"] == fault.subject
    assert set(problem["affects"]) == {LABEL}
    code, doc = fsck_json(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert code == doc["exit"] == FSCK_CORRECTED
    assert doc["repaired"] and not doc["unrepaired"] and doc["remaining"] == []


def test_one_repair_reaches_what_a_repaired_metadata_pack_hid(cafs, copies: Damaged, tmp_path: Path) -> None:
    # The disk lost the root's metadata pack, a data pack below it and the index object.
    # Without an index (a cache of trailers) only the walk from the root finds a missing
    # pack, and the walk cannot pass the root until its pack is back: the data pack is
    # seen, and replaced, only by a check after that repair, in the same run.
    root = missing_root(copies)
    data, _ = _big_pack(copies.layout)
    assert copies.layout.kinds[data] == KIND_DATA
    pack_path(copies.repo, data).unlink()
    for index in (copies.repo / "index").iterdir():
        index.unlink()
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED and root.subject in r.out and data.hex() not in r.out, r.out
    r = fsck(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert f"error: missing-pack {data.hex()}" in r.out and f"repaired: pack {data.hex()}" in r.out, r.out
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_CLEAN, r.out + r.err
    assert_extracts(cafs, copies.repo, copies.src, tmp_path / "out")


def test_unreadable_snapshot_claims_no_unreferenced_packs(cafs, copies: Damaged) -> None:
    # Below a lost root every pack looks unreferenced; gc would reclaim them all.
    missing_root(copies)
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert "gc reclaims" not in r.out, r.out
    assert f"unreferenced packs cannot be told while a snapshot cannot be read whole: {LABEL}" in r.out, r.out
    code, doc = fsck_json(cafs, copies.repo)
    assert code == FSCK_UNCORRECTED
    assert doc["unreferenced_packs"] is None and doc["unreadable_snapshots"] == [LABEL], doc


def test_missing_repository_is_operational_error(cafs, tmp_path: Path) -> None:
    r = fsck(cafs, tmp_path / "no-such-repo")
    assert r.code == FSCK_OPERATIONAL
    assert "no-such-repo" in r.err


def test_missing_mirror_is_operational_error(cafs, copies: Damaged, tmp_path: Path) -> None:
    missing_pack(copies)
    r = fsck(cafs, copies.repo, "--repair", "--mirror", tmp_path / "no-such-mirror")
    assert r.code == FSCK_OPERATIONAL
    assert "no-such-mirror" in r.err and "not a cafs repository" in r.err, r.err


def test_read_data_fraction_reads_about_half(cafs, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(24 << 20))  # about 48 data packs
    repo = tmp_path / "repo"
    assert cafs("init", repo, *INIT_ARGS).code == 0
    assert cafs("import", src, repo, "--name", "ds").code == 0
    total = sum(files_under(repo / "packs").values())
    code, full = fsck_json(cafs, repo, "--read-data")
    assert code == FSCK_CLEAN and full["bytes_read"] == total
    code, half = fsck_json(cafs, repo, "--read-data=0.5")
    assert code == FSCK_CLEAN
    # 48 packs of similar size: a share outside 20-80 % is over 4 standard deviations away
    assert 0.2 * total <= half["bytes_read"] <= 0.8 * total, (half["bytes_read"], total)


def _reachable(root: object) -> Iterator[object]:
    """Every object reachable from ``root`` through the objects it holds (classes,
    modules and functions are not followed)."""
    seen, todo = {id(root)}, [root]
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if id(ref) not in seen and not isinstance(ref, (type, ModuleType, FunctionType)):
                seen.add(id(ref))
                todo.append(ref)
                yield ref


def test_a_clean_check_holds_no_path_per_chunk(pristine: Pristine) -> None:
    # fsck noted the first users (snapshot, path) of every chunk of every snapshot while
    # checking, in case --read-data found one damaged: a path per chunk, some 270 bytes a
    # chunk (2.7 GB for ten million files), kept to the end. A damaged chunk's files are
    # found when it is found (test_fault_is_found_and_named[flipped-data]).
    checker = Checker(Repository.open(open_store(str(pristine.repo))))
    report = checker.run(read_fraction=1.0)
    assert report.clean and report.chunks > 10
    paths = {show(p) for p in pristine.layout.files}
    assert not paths & {o for o in _reachable(checker) if isinstance(o, str)}


def test_a_check_keeps_the_nodes_it_verified_as_bytes(pristine: Pristine, monkeypatch: pytest.MonkeyPatch) -> None:
    # The checker kept every node it verified decoded to the end, some 600 bytes per
    # entry (6 GB for ten million files): now their bytes, and a bounded few decoded.
    monkeypatch.setattr(metacache, "DECODED_ITEMS", 10, raising=False)
    checker = Checker(Repository.open(open_store(str(pristine.repo))))
    assert checker.run(read_fraction=1.0).clean
    assert checker.run().clean  # walked again from the bytes kept
    entries = len(pristine.layout.files) + len(pristine.layout.dirs)
    held = sum(isinstance(o, Entry) for o in _reachable(checker))
    assert held < entries // 2, (held, entries)


# -- the cache --------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@contextmanager
def mounted(source: str, mnt: Path, options: str) -> Iterator[int]:
    """Mount ``source`` at ``mnt`` with the mount helper; yields the daemon's pid."""
    mnt.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "cafs.mount_helper", source, str(mnt), "-o", options],
                       capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
    assert r.returncode == 0, r.stderr
    pid: int | None = None
    try:
        pid = int(os.getxattr(mnt, "user.cafs.pid"))
        yield pid
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=MOUNT_TIMEOUT)
        if pid is not None:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not _gone(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _gone(pid):
                os.kill(pid, 9)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=MOUNT_TIMEOUT)


def read_all(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            if not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def stats(mnt: Path) -> dict[str, int]:
    return dict(json.loads(os.getxattr(mnt, "user.cafs.stats")))


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@pytest.fixture
def cached(copies: Damaged, tmp_path: Path) -> Path:
    """A chunk cache of the whole snapshot: mounted with cache_mode=full, read, unmounted."""
    cache = tmp_path / "chunkcache"
    with mounted(f"{copies.repo}#ds", tmp_path / "mnt", f"cache={cache},cache_mode=full"):
        got = read_all(tmp_path / "mnt")
    assert got == read_all(copies.src)
    return cache


def test_damaged_cache_extent(cafs, copies: Damaged, cached: Path) -> None:
    _pack, span = _big_pack(copies.layout)
    sparse = cached / copies.layout.repo_id / "data" / span.pack.hex()[:2] / span.pack.hex()
    flip(sparse, span.offset + span.stored_length // 2)
    r = fsck(cafs, copies.repo, "--cache", cached)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert f"cache extent {span.pack.hex()[:16]}@{span.offset}" in r.out
    r = fsck(cafs, copies.repo, "--cache", cached, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    r = fsck(cafs, copies.repo, "--cache", cached)
    assert r.code == FSCK_CLEAN, r.out + r.err


def test_a_cache_other_users_could_write_is_refused_not_rebuilt(cafs, copies: Damaged, tmp_path: Path) -> None:
    # its data/ group-writable (an older cafs under umask 002): fsck --cache called the
    # LMDB file damaged, and --repair moved it aside (every cached extent forgotten),
    # then failed to open the fresh one for the same reason
    cache = tmp_path / "cache"
    assert cafs("prefetch", f"{copies.repo}#ds", "--cache", cache, "--no-progress").code == 0
    root = cache / copies.layout.repo_id
    (root / "data").chmod(0o775)
    before = sorted(p.name for p in root.iterdir())
    said = f"cache directory {root / 'data'} (mode 0775) writable by other users"
    for args in ((), ("--repair",)):
        r = fsck(cafs, copies.repo, "--cache", cache, *args)
        assert r.code == FSCK_OPERATIONAL and said in r.err and r.err.count("\n") == 1, (args, r.out + r.err)
        assert r.err.endswith(f"chmod -R go-w {root}\n") and "damaged" not in r.out + r.err
        assert sorted(p.name for p in root.iterdir()) == before  # no meta.lmdb.damaged-*
    (root / "data").chmod(0o755)
    r = fsck(cafs, copies.repo, "--cache", cache)
    assert r.code == FSCK_CLEAN, r.out + r.err
    assert "ds@1: 100.0% cached" in cafs("cache", "status", f"{copies.repo}#ds", "--cache", cache).out  # kept


def _garble_lmdb(cache: Path, repo_id: str) -> None:
    with open(cache / repo_id / "meta.lmdb" / "data.mdb", "r+b") as f:
        f.write(os.urandom(16 << 10))


def _garble_lmdb_pages(cache: Path, repo_id: str) -> None:
    """Damage the file from its fifth page on: LMDB opens it, and meets the damage only
    when a read or a write walks into it."""
    data = cache / repo_id / "meta.lmdb" / "data.mdb"
    garbled = bytearray(data.read_bytes())
    for i in range(20000, len(garbled)):
        garbled[i] ^= 0x5A
    data.write_bytes(garbled)


@pytest.mark.parametrize("meanwhile", ["evicted", "inserted"])
def test_a_cache_that_a_mount_uses_meanwhile_is_clean(cafs, repo: Path, cache_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch, meanwhile: str) -> None:
    # mounts evict and insert while fsck checks the cache: extents listed, then evicted
    # before their bytes were read, were 'bytes missing from the sparse file', and a size
    # read after inserts 'differed from the extents'' (a repair then set the size too low)
    for name, seed in (("one", 1), ("two", 2)):
        make_tree(tmp_path / name, seed=seed, big_file_size=1 << 20)
        assert cafs("import", tmp_path / name, repo, "--name", name, "--no-progress").code == 0
    assert cafs("prefetch", f"{repo}#one", "--no-progress").code == 0
    at = cachecheck._Trailers.at
    done = []

    def at_while_used(self: cachecheck._Trailers, pack: bytes, offset: int) -> Location | None:
        if not done:  # as the first extent is checked, another process uses the cache
            done.append(True)
            args = ["cache", "gc", "--size", "0"] if meanwhile == "evicted" else \
                   ["prefetch", f"{repo}#two", "--no-progress"]
            r = run_cafs(*args, cache=cache_dir)
            assert r.returncode == 0, r.stderr
        return at(self, pack, offset)

    monkeypatch.setattr(cachecheck._Trailers, "at", at_while_used)
    r = fsck(cafs, repo, "--cache", cache_dir)
    assert done and r.code == FSCK_CLEAN, r.out
    monkeypatch.setattr(cachecheck._Trailers, "at", at)
    code, doc = fsck_json(cafs, repo, "--cache", cache_dir)
    assert code == FSCK_CLEAN and doc["cache_problems"] == [], doc


@pytest.mark.parametrize("repair", [False, True], ids=["check", "repair"])
def test_a_cache_of_packs_gc_removed_is_clean(cafs, repo: Path, cache_dir: Path, tmp_path: Path,
                                              repair: bool) -> None:
    # a host cached ds@1; the ref moved on, ds@1 was forgotten and gc removed its packs:
    # every cached extent of them was 'no such chunk in the repository', exit 4, on a
    # healthy cache (and --repair dropped bytes a mount of ds@1 may still be reading)
    for seed in (1, 2):
        make_tree(tmp_path / f"t{seed}", seed=seed, big_file_size=1 << 20)
        assert cafs("import", tmp_path / f"t{seed}", repo, "--name", "ds", "--no-progress").code == 0
        if seed == 1:
            assert cafs("prefetch", f"{repo}#ds@1", "--no-progress").code == 0
    assert cafs("forget", repo, "ds", "--jid", "1").code == 0
    r = cafs("gc", repo)
    assert r.code == 0 and "deleted 0 unreferenced" not in r.out, r.out + r.err
    repo_id = Repository.open(open_store(str(repo))).config.repo_id
    in_repo = {p.name for p in (repo / "packs").glob("*/*")}
    cached_packs = {p.name for p in (cache_dir / repo_id / "data").glob("*/*")}
    assert cached_packs - in_repo, "no cached pack was removed: the test proves nothing"
    args = ("--cache", cache_dir, "--repair") if repair else ("--cache", cache_dir)
    r = fsck(cafs, repo, *args)
    assert r.code == FSCK_CLEAN, r.out + r.err
    assert "error:" not in r.out and re.search(r"cache: \d+ extent\(s\) of packs the repository no longer has", r.out), r.out
    code, doc = fsck_json(cafs, repo, "--cache", cache_dir)
    assert code == FSCK_CLEAN and doc["cache_problems"] == [] and doc["cache_gone_extents"] > 0, doc
    assert {p.name for p in (cache_dir / repo_id / "data").glob("*/*")} == cached_packs  # nothing dropped


def test_damaged_cache_lmdb_is_rebuilt(cafs, copies: Damaged, cached: Path) -> None:
    _garble_lmdb(cached, copies.layout.repo_id)
    r = fsck(cafs, copies.repo, "--cache", cached)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert "meta.lmdb" in r.out
    r = fsck(cafs, copies.repo, "--cache", cached, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    m = re.search(r"rebuilt it: (\d+) verified extent\(s\) kept", r.out)
    chunks = sum(len(e) for p, e in copies.layout.entries.items() if copies.layout.kinds[p] == KIND_DATA)
    assert m and int(m.group(1)) == chunks, r.out  # every chunk was read, cached, and is kept
    r = fsck(cafs, copies.repo, "--cache", cached)
    assert r.code == FSCK_CLEAN, r.out + r.err


@pytest.mark.parametrize("from_offset", [4096, 8192, 12288, 20000])
def test_commands_read_around_a_damaged_metadata_cache(cafs, copies: Damaged, tmp_path: Path, from_offset: int,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """LMDB checksums nothing: a page damaged past the header shows at open or only at a
    read. Either way ls, get and import go on from the repository, with a warning."""
    cache_dir = Path(os.environ["CAFS_CACHE_DIR"])
    listing = cafs("ls", "-R", f"{copies.repo}#ds")  # fills the metadata cache
    assert listing.code == 0, listing.err
    data = cache_dir / copies.layout.repo_id / "meta.lmdb" / "data.mdb"
    garbled = bytearray(data.read_bytes())
    for i in range(from_offset, len(garbled)):
        garbled[i] ^= 0x5A
    data.write_bytes(garbled)
    r = cafs("ls", "-R", f"{copies.repo}#ds")
    assert r.code == 0, r.err
    assert "metadata cache" in caplog.text and "Traceback" not in r.err, (caplog.text, r.err)
    assert r.out == listing.out
    r = cafs("get", f"{copies.repo}#ds", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(copies.src, tmp_path / "out")
    r = cafs("import", copies.src, copies.repo, "--name", "again", "--no-progress")
    assert r.code == 0, r.err


@pytest.mark.parametrize("garble", [_garble_lmdb, _garble_lmdb_pages])
def test_mount_on_damaged_cache_lmdb_serves_correct_bytes(copies: Damaged, cached: Path, tmp_path: Path,
                                                          garble) -> None:
    garble(cached, copies.layout.repo_id)
    mnt = tmp_path / "mnt"
    with mounted(f"{copies.repo}#ds", mnt, f"cache={cached},cache_mode=full"):
        assert_same_tree(copies.src, mnt)


def _shorten_cache_values(cache: Path, repo_id: str) -> None:
    """Every value of the chunk cache's LMDB databases three bytes long: damage LMDB
    itself does not see (it checksums nothing), as a flipped length in a page makes."""
    import lmdb

    env = lmdb.open(str(cache / repo_id / "meta.lmdb"), max_dbs=8)
    try:
        for name in (b"extents", b"cachestat"):
            db = env.open_db(name)
            with env.begin(write=True, db=db) as txn:
                for key, _value in list(txn.cursor()):
                    txn.put(key, b"\x01\x02\x03")
    finally:
        env.close()


def test_cache_values_of_another_length_are_damage(cafs, copies: Damaged, cached: Path, tmp_path: Path) -> None:
    # they were a struct.error: a mount's xattrs (its pid, its stats) failed with EIO,
    # and fsck --cache stopped with a traceback instead of rebuilding the cache
    _shorten_cache_values(cached, copies.layout.repo_id)
    mnt = tmp_path / "mnt"
    with mounted(f"{copies.repo}#ds", mnt, f"cache={cached},cache_mode=full"):
        assert_same_tree(copies.src, mnt)
        assert stats(mnt)["cache_size"] == -1
    r = fsck(cafs, copies.repo, "--cache", cached)
    assert r.code == FSCK_UNCORRECTED and "meta.lmdb: damaged (a cache record of 3 bytes" in r.out, r.out + r.err
    r = fsck(cafs, copies.repo, "--cache", cached, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert fsck(cafs, copies.repo, "--cache", cached).code == FSCK_CLEAN


def test_mount_refuses_to_serve_a_corrupt_pack(copies: Damaged, tmp_path: Path) -> None:
    # a chunk in the data pack shared by the most files: its neighbours must still read
    layout = copies.layout
    pack = max((p for p, k in layout.kinds.items() if k == KIND_DATA), key=lambda p: len(layout.pack_users(p)))
    chunk = next(loc for loc in layout.entries[pack] if layout.chunk_users(loc.id))
    flip(pack_path(copies.repo, pack), chunk.offset + chunk.stored_length // 2)
    bad = layout.chunk_users(chunk.id)
    mnt = tmp_path / "mnt"
    with mounted(f"{copies.repo}#ds", mnt, f"cache={tmp_path / 'cache'}"):
        for path in sorted(bad):
            with pytest.raises(OSError) as info:
                (mnt / os.fsdecode(path)).read_bytes()
            assert info.value.errno == errno.EIO
        good = set(layout.files) - bad
        assert len(good) > 20 and good & layout.pack_users(pack)
        for path in sorted(good):
            got = (mnt / os.fsdecode(path)).read_bytes()
            assert got == (copies.src / os.fsdecode(path)).read_bytes(), path


def test_mount_refetches_a_cache_extent_damaged_behind_its_back(cafs, tmp_path: Path) -> None:
    # The mount keeps 64 MiB of verified chunks in memory; a file larger than that pushes
    # its first chunks out, so reading it again goes to the sparse cache file.
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(80 << 20)
    (src / "huge").write_bytes(data)
    repo = tmp_path / "repo"
    assert cafs("init", repo, *INIT_ARGS).code == 0
    assert cafs("import", src, repo, "--name", "ds").code == 0
    layout = read_layout(repo)
    first = layout.files[b"huge"][0]
    cache, mnt = tmp_path / "chunkcache", tmp_path / "mnt"
    with mounted(f"{repo}#ds", mnt, f"cache={cache},cache_mode=full"):
        assert (mnt / "huge").read_bytes() == data
        sparse = cache / layout.repo_id / "data" / first.pack.hex()[:2] / first.pack.hex()
        flip(sparse, first.offset + first.stored_length // 2, 8)
        drop_page_cache()
        assert (mnt / "huge").read_bytes() == data
        assert stats(mnt)["damaged_extents"] >= 1


def test_a_local_file_that_fails_is_an_operational_error(cafs, copies: Damaged, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # An OSError from a local file (here the cache, as a user without read access to it
    # meets it) is fsck(8)'s 8, not the 1 every other command gives, which means "corrected".
    from cafs import cachecheck

    def denied(*_args: object, **_kw: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "cache" / "data"))

    monkeypatch.setattr(cachecheck, "check_cache", denied)
    r = fsck(cafs, copies.repo, "--cache", tmp_path / "cache")
    assert r.code == FSCK_OPERATIONAL, r.out + r.err
    assert r.err.strip() == f"cafs fsck: {tmp_path / 'cache' / 'data'}: Permission denied", r.err


def test_truncated_metadata_cache_is_moved_aside_not_a_crash(cafs, cafs_proc, copies: Damaged) -> None:
    """LMDB maps its file: a page past the end of a truncated one is a SIGBUS that kills
    the process. A file shorter than its meta page says is damaged, like one LMDB refuses."""
    cache_dir = Path(os.environ["CAFS_CACHE_DIR"])
    listing = cafs("ls", "-R", f"{copies.repo}#ds")  # fills the metadata cache
    assert listing.code == 0, listing.err
    data = cache_dir / copies.layout.repo_id / "meta.lmdb" / "data.mdb"
    assert data.stat().st_size > 3 * 4096
    os.truncate(data, 2 * 4096)  # both meta pages kept: LMDB opens it
    r = cafs_proc("ls", "-R", f"{copies.repo}#ds")
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout == listing.out and "truncated" in r.stderr, r.stderr
    assert data.stat().st_size > 3 * 4096  # filled again by that ls
    os.truncate(data, 2 * 4096)
    r = cafs_proc("fsck", copies.repo, "--cache", cache_dir)
    assert r.returncode == FSCK_UNCORRECTED and "truncated" in r.stdout, (r.returncode, r.stdout, r.stderr)
    r = cafs_proc("fsck", copies.repo, "--cache", cache_dir, "--repair")
    assert r.returncode == FSCK_CORRECTED, (r.returncode, r.stdout, r.stderr)
    r = cafs_proc("fsck", copies.repo, "--cache", cache_dir)
    assert r.returncode == FSCK_CLEAN, (r.returncode, r.stdout, r.stderr)


def test_a_pack_that_cannot_be_written_stops_no_other_repair(cafs, copies: Damaged, tmp_path: Path) -> None:
    # Where one pack was, a directory now stands: the mirror's copy cannot be written
    # there. The other missing pack is replaced all the same, and the report says both.
    data = sorted(p for p, k in copies.layout.kinds.items() if k == KIND_DATA)
    blocked, lost = data[0], data[1]
    pack_path(copies.repo, blocked).unlink()
    pack_path(copies.repo, blocked).mkdir()
    pack_path(copies.repo, lost).unlink()
    r = fsck(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert f"repaired: pack {lost.hex()}: replaced" in r.out, r.out
    assert f"not repaired: pack {blocked.hex()}: the verified copy from" in r.out and "could not be written" in r.out
    pack_path(copies.repo, blocked).rmdir()
    r = fsck(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert fsck(cafs, copies.repo, "--read-data").code == FSCK_CLEAN
    assert_extracts(cafs, copies.repo, copies.src, tmp_path / "out")


def test_index_that_disagrees_with_a_trailer_is_found_and_rewritten(cafs, copies: Damaged, tmp_path: Path) -> None:
    # A well-formed index object (its name matches its bytes) that places a chunk at a
    # wrong offset: the next import deduplicating against it would commit a snapshot
    # whose span reads nothing. fsck compares every index with the trailers.
    from cafs.format.index import PackSummary, encode_index
    from cafs.ids import digest

    pack, span = _big_pack(copies.layout)
    entries = tuple(e._replace(offset=e.offset + 1) if e.id == span.id else e for e in copies.layout.entries[pack])
    data = encode_index([PackSummary(pack, pack_path(copies.repo, pack).stat().st_size, KIND_DATA, entries)])
    key = f"index/{digest(data).hex()}"
    (copies.repo / key).write_bytes(data)
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert f"error: bad-index {key}: lists 1 object(s) pack {pack.hex()[:16]}'s trailer does not" in r.out, r.out
    r = fsck(cafs, copies.repo, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert not (copies.repo / key).exists()
    r = cafs("import", copies.src, copies.repo, "--name", "again", "--no-progress")
    assert r.code == 0, r.err
    assert fsck(cafs, copies.repo, "--read-data").code == FSCK_CLEAN
    r = cafs("get", f"{copies.repo}#again", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(copies.src, tmp_path / "out")


@pytest.mark.parametrize("entry", [[], "past its pack"])
def test_an_index_entry_of_another_shape_is_passed_over(cafs, copies: Damaged, tmp_path: Path, entry: object) -> None:
    # A well-named index object (its name matches its bytes) whose entry is no location
    # in its pack: an import passes it over (reads the trailers, deduplicates against
    # nothing it says), fsck names it, repair rewrites it; never a traceback.
    import msgpack

    from cafs.ids import digest

    pack, span = _big_pack(copies.layout)
    length = pack_path(copies.repo, pack).stat().st_size
    if entry == "past its pack":
        entry = [span.id, length, span.stored_length, span.length, span.codec]
    data = msgpack.packb([1, [[pack, length, KIND_DATA, [entry]]]])
    key = f"index/{digest(data).hex()}"
    (copies.repo / key).write_bytes(data)
    r = cafs("import", copies.src, copies.repo, "--name", "again", "--no-progress")
    assert r.code == 0, r.err
    r = cafs("get", f"{copies.repo}#again", tmp_path / "out")
    assert r.code == 0, r.err
    assert_same_tree(copies.src, tmp_path / "out")
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert f"error: bad-index {key}: " in r.out and "Traceback" not in r.err, r.out + r.err
    r = fsck(cafs, copies.repo, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert not (copies.repo / key).exists()
    assert fsck(cafs, copies.repo, "--read-data").code == FSCK_CLEAN


def test_what_no_ref_may_be_named_is_named_plainly(cafs, copies: Damaged) -> None:
    # Directories under refs/ that cafs never wrote (a name no ref may have) are skipped
    # by every other command; fsck names them (test_import_get), but as what they are,
    # not as a snapshot it cannot read ("invalid object key", the whole snapshot lost,
    # unreferenced packs no longer told) that a mirror could restore.
    for name in ("bad name", ".hidden", "-dash"):
        (copies.repo / "refs" / name).mkdir()
        (copies.repo / "refs" / name / f"{1:020d}").write_bytes(b"not a journal entry")
    (copies.repo / "refs" / "ds" / "notes.txt").write_bytes(b"junk")
    r = fsck(cafs, copies.repo, "--read-data")
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    for name in ("bad name", ".hidden", "-dash"):
        assert (f"error: bad-journal refs/{name}/{1:020d}: not a journal entry: no ref may be named {name!r}, "
                "so cafs never wrote it and nothing reads it; remove it") in r.out, r.out
    assert "invalid object key" not in r.out and "affects" not in r.out and "cannot be told" not in r.out, r.out
    r = fsck(cafs, copies.repo, "--repair", "--mirror", copies.mirror)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert f"not repaired: refs/bad name/{1:020d}: not a journal key cafs writes; remove it by hand" in r.out, r.out
    for name in ("bad name", ".hidden", "-dash"):
        subprocess.run(["rm", "-r", copies.repo / "refs" / name], check=True)
    assert fsck(cafs, copies.repo).code == FSCK_CLEAN


@pytest.mark.parametrize("pointer", [b"%020d\n" % 9, b"garbage\n"])
def test_a_latest_pointer_that_misleads_readers_without_listings_is_rewritten(cafs, copies: Damaged,
                                                                              pointer: bytes) -> None:
    from cafs.errors import ListingUnavailable
    from storewrap import PassThroughStore

    class Unlisted(PassThroughStore):  # a web server without directory listings
        def list(self, prefix: str):
            raise ListingUnavailable(f"{self.url}: cannot list {prefix}")

    def seen_without_listing() -> list[int]:
        return Repository.open(Unlisted(open_store(str(copies.repo)))).newest_jids("ds")

    assert seen_without_listing() == [1]
    (copies.repo / "refs" / "ds" / "latest").write_bytes(pointer)
    assert seen_without_listing() == []  # "no ref named 'ds'" over such a server
    r = fsck(cafs, copies.repo)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert "error: bad-latest refs/ds/latest:" in r.out and "finds no snapshot of ds" in r.out, r.out
    r = fsck(cafs, copies.repo, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert "repaired: refs/ds/latest: now says 1" in r.out, r.out
    assert seen_without_listing() == [1]
    assert fsck(cafs, copies.repo).code == FSCK_CLEAN


@pytest.mark.parametrize("damage", ["directory", "data-is-a-file"])
def test_cache_file_that_is_not_a_file(cafs, copies: Damaged, tmp_path: Path, damage: str) -> None:
    # A sparse cache file replaced by a directory (or the data directory by a file) is
    # damage fsck --cache reports and repairs like missing bytes, not an OSError.
    cache = tmp_path / "chunkcache"
    r = cafs("prefetch", f"{copies.repo}#ds", "--cache", cache, "--no-progress")
    assert r.code == 0, r.err
    data = cache / copies.layout.repo_id / "data"
    if damage == "directory":
        victim = sorted(data.glob("*/*"))[0]
        victim.unlink()
        victim.mkdir()
    else:
        subprocess.run(["rm", "-rf", data], check=True)
        data.write_bytes(b"")
    r = fsck(cafs, copies.repo, "--cache", cache)
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    assert "bytes missing from the sparse file" in r.out, r.out
    r = fsck(cafs, copies.repo, "--cache", cache, "--repair")
    assert r.code == FSCK_CORRECTED, r.out + r.err
    assert fsck(cafs, copies.repo, "--cache", cache).code == FSCK_CLEAN
    assert cafs("cache", "gc", "--size", "0", "--cache", cache).code == 0


@pytest.mark.parametrize("name", ["truncated-pack", "flipped-data"])
def test_an_affected_file_is_named_once(cafs, copies: Damaged, name: str) -> None:
    # data/big has several chunks in the damaged pack: it was named once per chunk
    # ("big, big, big, big, big (+2 more)"), crowding out the other files affected.
    fault = ALL_FAULTS[name](copies)
    code, doc = fsck_json(cafs, copies.repo, *(("--read-data",) if fault.read_data else ()))
    assert code == FSCK_UNCORRECTED
    (problem,) = [p for p in doc["problems"] if p["kind"] == fault.kind]
    paths = problem["affects"][LABEL]
    assert "data/big" in paths and len(paths) == len(set(paths)), paths


PACK_OBJECT = r"/packs/../[0-9a-f]{64}$"  # a pack itself, not a listing


def test_a_byte_flipped_in_transit_is_not_a_damaged_pack(cafs, copies: Damaged, nginx_server,
                                                         fault_proxy) -> None:
    """A pack whose bytes fail verification once, on the way (a proxy, a NIC), is read
    again, as every verified read is: fsck --read-data finds the repository sound, and
    --repair --salvage has nothing to set aside."""
    proxy = fault_proxy(nginx_server(copies.repo.parent))
    url = f"{proxy.url}/repo"
    for args in ((), ("--repair", "--salvage")):
        proxy.set_mode("flip_bytes", method="GET", match=PACK_OBJECT, ranged=False, times=1)
        r = fsck(cafs, url, "--read-data", *args)
        assert proxy.faults_fired == 1 + len(args) // 2
        assert r.code == FSCK_CLEAN, r.out + r.err
    assert not (copies.repo / "damaged").exists()


@pytest.mark.parametrize("read_data", [False, True], ids=["trailers", "read-data"])
def test_a_store_that_keeps_failing_is_an_operational_error(cafs, copies: Damaged, nginx_server, fault_proxy,
                                                             monkeypatch: pytest.MonkeyPatch, read_data: bool) -> None:
    """A pack the server answers 503 for until the deadline is not a corrupt pack: fsck
    cannot tell, says which request failed, and exits 8 (operational), not 4; nothing is
    repaired or set aside."""
    pack, _ = _big_pack(copies.layout)
    proxy = fault_proxy(nginx_server(copies.repo.parent))
    proxy.set_mode("status", status=503, match=pack.hex(), ranged=False if read_data else True)
    monkeypatch.setenv("CAFS_TIMEOUT", "1")
    r = fsck(cafs, f"{proxy.url}/repo", "--repair", "--salvage", *(["--read-data"] if read_data else []))
    assert r.code == FSCK_OPERATIONAL, r.out + r.err
    assert pack.hex() in r.err and "503" in r.err and "Traceback" not in r.err, r.err
    assert "corrupt-pack" not in r.out and not (copies.repo / "damaged").exists(), r.out


def test_nodes_that_do_not_fit_where_they_are_are_found(cafs, repo: Path, tmp_path: Path) -> None:
    # Nodes that verify against their ids but that no reader can use where a snapshot
    # has them (written by a hostile or buggy writer): cafs get, cat, stats and a mount
    # fail on those paths, so fsck must not call the repository clean.
    from cafs.format.nodes import DirIndexNode, PageRef
    from forge import Forger, directory, file, large_file

    f = Forger(repo)
    good = f.chunk(b"good bytes\n")
    sub = f.node(TreeNode((file(b"inner", [good]),)))
    spans = f.node(FileNode((good,) * 20))
    page_a = f.node(TreeNode((file(b"a", [good]), file(b"b", [good]))))
    page_c = f.node(TreeNode((file(b"c", [good]),)))
    entries = (
        file(b"0-good", [good]),
        directory(b"1-dir-of-spans", spans, 1),
        large_file(b"2-file-of-a-tree", sub, 11),
        large_file(b"3-file-of-other-size", spans, 5),
        directory(b"4-more-than-its-size", sub, 0),
        directory(b"5-paged", f.node(DirIndexNode((PageRef(b"a", 1, page_a), PageRef(b"c", 1, page_c)))), 3),
        directory(b"6-good-dir", sub, 1),
        large_file(b"7-good-large-file", spans, 20 * good.length),
    )
    f.commit("forged", f.node(TreeNode(entries)), len(entries))

    r = fsck(cafs, repo, "--read-data")
    assert r.code == FSCK_UNCORRECTED, r.out + r.err
    problems = [line for line in r.out.splitlines() if line.startswith("error: ")]
    affected = re.findall(r"^    affects forged@1: (.*)$", r.out, re.M)
    assert len(problems) == 5 and all(p.startswith("error: bad-node ") for p in problems), r.out
    assert sorted(affected) == ["1-dir-of-spans (and everything below)", "2-file-of-a-tree",
                                "3-file-of-other-size", "4-more-than-its-size", "5-paged"], r.out
    assert "is a file node where a directory's node belongs" in r.out
    assert "holds spans of 220 bytes, its file's entry says 5" in r.out
    assert "is a directory page of 2 entries from b'a'; its index says 1 from b'a'" in r.out
    r = fsck(cafs, repo, "--repair")
    assert r.code == FSCK_UNCORRECTED and r.out.count(": no repair known") == 5, r.out
    for path in ("0-good", "6-good-dir/inner", "7-good-large-file"):
        r = cafs("cat", f"{repo}#forged:{path}")
        assert r.code == 0 and r.out == "good bytes\n" * (20 if path.startswith("7") else 1), r.err


# -- cache layout versions ---------------------------------------------------------------------


def _cache_made_before_layout_versions(repo: Path, layout: Layout, cache: Path) -> Path:
    """A cache of every node and chunk of ``repo``, written by hand from the layout a cafs
    kept before caches recorded their layout version (docs/FORMAT.md): LMDB databases
    ``nodes`` (id -> plain bytes), ``extents`` (pack + offset -> stored length, last use)
    and ``cachestat`` (``size`` alone), and a sparse file per data pack. Its directory."""
    import lmdb

    r = Repository.open(open_store(str(repo)))
    root = cache / layout.repo_id
    os.makedirs(root / "meta.lmdb", mode=0o700)
    env = lmdb.open(str(root / "meta.lmdb"), max_dbs=8)
    try:
        nodes, extents, stat = (env.open_db(name) for name in (b"nodes", b"extents", b"cachestat"))
        total = 0
        with env.begin(write=True) as txn:
            for pack, entries in layout.entries.items():
                if layout.kinds[pack] == KIND_META:
                    for loc in entries:
                        txn.put(loc.id, r.read_object(loc), db=nodes)
                    continue
                stored = pack_path(repo, pack).read_bytes()
                sparse = root / "data" / pack.hex()[:2] / pack.hex()
                sparse.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with open(sparse, "wb") as f:
                    for loc in entries:
                        os.pwrite(f.fileno(), stored[loc.offset:loc.offset + loc.stored_length], loc.offset)
                        txn.put(pack + loc.offset.to_bytes(8, "big"),
                                loc.stored_length.to_bytes(4, "big") + int(time.time()).to_bytes(8, "big"), db=extents)
                        total += loc.stored_length
            txn.put(b"size", total.to_bytes(8, "big"), db=stat)
    finally:
        env.close()
    return root


def _layout_of(root: Path) -> bytes | None:
    import lmdb

    env = lmdb.open(str(root / "meta.lmdb"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"cachestat", create=False)) as txn:
            return txn.get(b"layout")
    finally:
        env.close()


def test_a_cache_made_before_layout_versions_is_read_and_recorded(cafs, copies: Damaged, tmp_path: Path) -> None:
    cache = tmp_path / "old-cache"
    root = _cache_made_before_layout_versions(copies.repo, copies.layout, cache)
    assert _layout_of(root) is None
    r = fsck(cafs, copies.repo, "--cache", cache)  # every node and extent verified
    assert r.code == FSCK_CLEAN, r.out + r.err
    r = cafs("cache", "status", f"{copies.repo}#ds", "--cache", cache)
    assert r.code == 0 and "ds@1: 100.0% cached" in r.out, r.out + r.err
    assert _layout_of(root) == (1).to_bytes(8, "big")  # of layout 1, now said


def test_a_cache_of_a_newer_layout_is_refused_and_left_untouched(cafs, copies: Damaged, tmp_path: Path) -> None:
    import lmdb

    cache = tmp_path / "newer-cache"
    root = _cache_made_before_layout_versions(copies.repo, copies.layout, cache)
    env = lmdb.open(str(root / "meta.lmdb"), max_dbs=8)
    with env.begin(db=env.open_db(b"cachestat"), write=True) as txn:
        txn.put(b"layout", (2).to_bytes(8, "big"))  # as a cafs of cache layout 2 would
    env.close()

    def contents() -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name not in ("lock.mdb", "in-use")}  # locks, taken to look

    before = contents()
    said = f"the cache in {root} has layout version 2, which a newer cafs made"
    for args, code in ((("ls", f"{copies.repo}#ds"), 1), (("prefetch", f"{copies.repo}#ds"), 1),
                       (("cache", "status"), 1), (("cache", "gc", copies.repo, "--size", "1K"), 1),
                       (("fsck", copies.repo, "--repair"), FSCK_OPERATIONAL)):
        r = cafs(*args, "--cache", cache)
        assert r.code == code and said in r.err and r.err.count("\n") == 1, (args, r.out + r.err)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = cafs("mount", f"{copies.repo}#ds", mnt, "-o", "cache_mode=full", "--cache", cache)
    if r.code == 0:  # the old code mounted it
        assert cafs("umount", mnt).code == 0
    assert r.code == 32 and said in r.err, r.out + r.err
    assert contents() == before

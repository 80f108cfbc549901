"""Real FUSE mounts of real snapshots, served by real daemon processes.

The oracle is the source tree: what the mount shows must equal it (names, types, sizes,
modes, mtimes, symlink targets, every byte). Each test checks one behaviour; mounts come
from ``mountfix.mounted``, which always unmounts and waits for the daemon. Most tests
share one read-only mount of one imported tree (module scope); tests that need a cold
kernel page cache, a particular cache state or a dying daemon make their own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mountfix import (
    Mount,
    cafs_mounts,
    env,
    import_tree,
    is_mounted,
    make_repo,
    mountd_pids,
    mounted,
    poll,
    process_alive,
    run_cafs,
    run_mount_helper,
    unmount,
    wait_exit,
)
from treegen import ODD_SYMLINK_TARGET, assert_same_tree, make_tree, manifest

from cafs.metacache import MetaCache, NodeReader
from cafs.naming import find_snapshot
from cafs.repository import Repository
from cafs.stores import open_store
from cafs.tree import file_spans, resolve

BIG = (4 << 20) + 12345  # several packs of 512 KiB, dozens of chunks
WIDE = 20_000
MiB = 1 << 20


@dataclass
class Dataset:
    src: Path
    repo: Path
    source: str  # REPO#NAME
    cache: Path  # the importer's cache (a mount gets its own)


def new_mountpoint(parent: Path, name: str = "mnt") -> Path:
    path = parent / name
    path.mkdir()
    return path


def full_cache(cache: Path, size: str = "256M") -> str:
    """Options of a mount that writes every fetched chunk through to its own cache."""
    return f"cache={cache},cache_size={size},cache_mode=full"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    base = tmp_path_factory.mktemp("dataset")
    src = make_tree(base / "src", seed=11, big_file_size=BIG)
    repo = make_repo(base / "repo", base / "import-cache")
    return Dataset(src, repo, import_tree(src, repo, "snap", base / "import-cache"),
                   base / "import-cache")


@pytest.fixture(scope="module")
def mnt(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount of ``dataset`` shared by the read-only tests of this module."""
    base = tmp_path_factory.mktemp("shared-mount")
    with mounted(dataset.source, new_mountpoint(base), full_cache(base / "cache")) as m:
        yield m


@pytest.fixture
def fresh_mount(dataset: Dataset, tmp_path: Path) -> Iterator[Mount]:
    """A mount of its own: a cold kernel page cache and an empty chunk cache."""
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(tmp_path / "cache")) as m:
        yield m


# -- the tree -------------------------------------------------------------------------------


def test_tree_equals_source(dataset: Dataset, mnt: Mount) -> None:
    assert_same_tree(dataset.src, mnt.path, symlink_mtimes=True)


def test_default_options_read_a_local_repository_in_place(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for pack in (dataset.repo / "packs").rglob("*"):
        if pack.is_file():
            pack.read_bytes()  # so that small reads find their pages and are served inline
    with mounted(dataset.source, new_mountpoint(tmp_path), f"cache={cache}") as m:
        assert_same_tree(dataset.src, m.path)
        s = m.stats()
        assert s["bytes_fetched"] > 0 and s["inline_loads"] > 0
    assert not list(cache.glob("*/data/*/*")), "cache_mode=auto copied chunks of a local repository"


def test_stat_fields(dataset: Dataset, mnt: Mount) -> None:
    items = manifest(dataset.src)
    subdirs = {rel: 0 for rel, item in items.items() if item.kind == "d"}
    subdirs[b""] = 0
    for rel, item in items.items():
        if item.kind == "d":
            subdirs[rel.rpartition(b"/")[0]] += 1
    for rel, item in items.items():
        s = os.lstat(os.fsencode(dataset.src) + b"/" + rel)
        m = os.lstat(os.fsencode(mnt.path) + b"/" + rel)
        where = rel.decode(errors="backslashreplace")
        assert (m.st_uid, m.st_gid) == (s.st_uid, s.st_gid), where
        assert m.st_mode == s.st_mode, where
        assert m.st_blocks == s.st_blocks, where  # as imported: du reads the same, sparse files too
        if item.kind == "f":
            assert m.st_size == s.st_size, where
            assert m.st_blksize >= 4096, where
        elif item.kind == "l":
            assert m.st_size == len(os.readlink(os.fsencode(dataset.src) + b"/" + rel)), where
        else:
            assert m.st_nlink == 2 + subdirs[rel], where
    for pair in ("dups/copy0", "dups/hardlink"):
        assert os.lstat(mnt.path / pair).st_nlink == 2
    assert os.lstat(mnt.path / "dups/copy1").st_nlink == 1


def _inodes(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[path] = (st.st_dev, st.st_ino)
    return out


def _drop_kernel_caches() -> bool:
    """Make the kernel forget dentries and inodes (it sends FORGET to the daemon); False
    where we may not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError:
        return False
    return True


def _same_file_groups(inodes: dict[str, tuple[int, int]], root: Path) -> set[frozenset[str]]:
    """The paths (relative to ``root``) grouped by the inode they share."""
    groups: dict[tuple[int, int], set[str]] = {}
    for path, key in inodes.items():
        groups.setdefault(key, set()).add(os.path.relpath(path, root))
    return {frozenset(g) for g in groups.values()}


def test_inode_numbers_are_unique_but_for_hard_links_and_stable(dataset: Dataset, mnt: Mount) -> None:
    first = _inodes(mnt.path)
    # names share an inode through the mount exactly when they share one on the source
    assert _same_file_groups(first, mnt.path) == _same_file_groups(_inodes(dataset.src), dataset.src)
    assert frozenset({"dups/copy0", "dups/hardlink"}) in _same_file_groups(first, mnt.path)
    assert len({dev for dev, _ino in first.values()}) == 1
    listed = {e.name: e.inode() for e in os.scandir(mnt.path / "dups")}
    assert listed["hardlink"] == listed["copy0"] == first[str(mnt.path / "dups/copy0")][1]
    assert listed["copy1"] != listed["copy0"]  # the same bytes, but not a link
    assert {p: os.lstat(p).st_ino for p in first} == {p: ino for p, (_d, ino) in first.items()}
    assert _inodes(mnt.path) == first
    if _drop_kernel_caches():
        assert _inodes(mnt.path) == first


# -- reads ------------------------------------------------------------------------------------


@dataclass
class BigFile:
    fd: int
    data: bytes
    boundaries: list[int]  # plain offsets where a chunk starts, 0 and EOF included


@pytest.fixture(scope="module")
def big(dataset: Dataset, mnt: Mount) -> Iterator[BigFile]:
    """``data/big`` opened once through the mount, its source bytes, and where its chunks
    start (read from the repository, so reads can aim at the boundaries)."""
    repo = Repository.open(open_store(str(dataset.repo)))
    reader = NodeReader(repo, None)
    spans = file_spans(reader, resolve(reader, find_snapshot(repo, "snap").root, b"data/big"))
    assert len(spans) >= 20 and len({s.pack for s in spans}) >= 4, "data/big must span packs"
    starts = [0]
    for s in spans:
        starts.append(starts[-1] + s.length)
    fd = os.open(mnt.path / "data/big", os.O_RDONLY)
    try:
        yield BigFile(fd, read_file(dataset.src / "data/big"), starts)
    finally:
        os.close(fd)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_reads_match_source(big: BigFile, data: st.DataObject) -> None:
    size = len(big.data)
    anchor = data.draw(st.one_of(st.sampled_from(big.boundaries), st.integers(0, size + MiB)),
                       label="anchor")
    offset = max(0, anchor + data.draw(st.integers(-5000, 5000), label="delta"))
    length = data.draw(st.one_of(st.integers(0, 8192), st.integers(0, 3 * MiB)), label="length")
    assert os.pread(big.fd, length, offset) == big.data[offset:offset + length]


def test_reads_at_and_past_end_of_file(big: BigFile) -> None:
    size = len(big.data)
    assert os.pread(big.fd, 100, size - 7) == big.data[-7:]
    assert os.pread(big.fd, 100, size) == b""
    assert os.pread(big.fd, 100, size + 12345) == b""
    assert os.pread(big.fd, 1, size - 1) == big.data[-1:]


def test_sequential_read_of_a_cold_file(dataset: Dataset, fresh_mount: Mount) -> None:
    with open(fresh_mount.path / "data/big", "rb", buffering=0) as f:
        pieces = []
        while block := f.read(131072 + 17):
            pieces.append(block)
    assert b"".join(pieces) == read_file(dataset.src / "data/big")


# -- directories ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A mount holding ``wide/``, a directory of 20,000 files (many directory pages)."""
    base = tmp_path_factory.mktemp("wide")
    src = base / "src"
    src.mkdir()
    (src / "wide").mkdir()
    for i in range(1, WIDE + 1):
        (src / "wide" / f"f{i:06d}").write_bytes(b"%d\n" % i)
    repo = make_repo(base / "repo", base / "import-cache")
    source = import_tree(src, repo, "wide", base / "import-cache")
    with mounted(source, new_mountpoint(base), full_cache(base / "cache")) as m:
        yield m.path / "wide"


WIDE_NAMES = [f"f{i:06d}" for i in range(1, WIDE + 1)]


def test_readdir_of_a_wide_directory_lists_every_name_once(wide: Path) -> None:
    names = os.listdir(wide)
    assert len(names) == WIDE
    assert sorted(names) == WIDE_NAMES


def test_readdir_resumes_in_name_order_while_interleaved(wide: Path) -> None:
    seen = []
    with os.scandir(wide) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            assert entry.is_file(follow_symlinks=False)
            if i in (0, 1023, 1024, 7777):
                # another listing and lookups between two getdents calls of this one
                assert len(os.listdir(wide)) == WIDE
                assert entry.stat(follow_symlinks=False).st_size == len(f"{int(entry.name[1:])}\n")
    assert seen == WIDE_NAMES


def test_a_listing_starts_with_dot_and_dotdot(mnt: Mount) -> None:
    sub = next(p for p in sorted(mnt.path.iterdir()) if p.is_dir() and not p.is_symlink())
    out = subprocess.run(["ls", "-a1i", "--", str(sub)], capture_output=True, text=True, check=True)
    (dot_ino, dot), (up_ino, up) = (line.split(None, 1) for line in out.stdout.splitlines()[:2])
    assert (dot, up) == (".", "..")
    assert (int(dot_ino), int(up_ino)) == (sub.stat().st_ino, mnt.path.stat().st_ino)
    assert len(out.stdout.splitlines()) == 2 + len(os.listdir(sub))


def test_lookup_in_a_wide_directory(wide: Path) -> None:
    for name in ("f000001", "f001024", "f001025", "f019999", "f020000"):
        assert (wide / name).read_bytes() == b"%d\n" % int(name[1:])
    for name in ("f000000", "f020001", "e", "g", "f0010245"):
        assert not (wide / name).exists()


# -- metadata calls ---------------------------------------------------------------------------


def test_readlink_returns_exact_targets(dataset: Dataset, mnt: Mount) -> None:
    links = sorted(os.listdir(dataset.src / "links"))
    assert links
    for name in links:
        assert os.readlink(os.fsencode(mnt.path / "links" / name)) == \
            os.readlink(os.fsencode(dataset.src / "links" / name))
    assert os.readlink(os.fsencode(mnt.path / "links/odd-target")) == ODD_SYMLINK_TARGET
    with pytest.raises(OSError) as exc:
        os.readlink(mnt.path / "data/f0000100")
    assert exc.value.errno == errno.EINVAL


def test_a_name_longer_than_namemax_is_enametoolong(mnt: Mount) -> None:
    namemax = os.statvfs(mnt.path).f_namemax
    assert (mnt.path / "odd" / ("x" * namemax)).is_file()
    for n in (namemax + 1, 1000):
        for op in (os.stat, lambda p: os.open(p, os.O_RDONLY | os.O_CREAT)):
            with pytest.raises(OSError) as exc:
                op(mnt.path / "odd" / ("x" * n))
            assert exc.value.errno == errno.ENAMETOOLONG, (n, exc.value)


def test_statfs(dataset: Dataset, mnt: Mount) -> None:
    s = os.statvfs(mnt.path)
    items = manifest(dataset.src)
    logical = sum(i.size for i in items.values() if i.kind == "f")
    assert s.f_namemax == 255
    assert s.f_flag & os.ST_RDONLY
    assert s.f_bfree == s.f_bavail == s.f_ffree == 0
    assert s.f_files == len(items) + 1  # and the root
    assert s.f_blocks * s.f_frsize >= logical > (s.f_blocks - 1) * s.f_frsize


def test_access(mnt: Mount) -> None:
    for rel in ("data/f0000100", "data/readonly", "data", ""):
        assert os.access(mnt.path / rel, os.R_OK)
        assert not os.access(mnt.path / rel, os.W_OK)
    assert os.access(mnt.path / "data/script.sh", os.X_OK)
    assert os.access(mnt.path / "data", os.X_OK)
    assert not os.access(mnt.path / "no-such-file", os.F_OK)


def test_xattr_id_of_a_single_chunk_file_is_its_blake3(dataset: Dataset, mnt: Mount) -> None:
    for rel in ("data/f0000001", "data/f0000100", "data/f0004096", "data/f0016384"):
        data = read_file(dataset.src / rel)
        want = blake3.blake3(data).hexdigest().encode()
        assert os.getxattr(mnt.path / rel, "user.cafs.id") == want


def test_xattr_id_of_files_follows_content(mnt: Mount) -> None:
    def cid(rel: str) -> bytes:
        return os.getxattr(mnt.path / rel, "user.cafs.id")

    assert cid("data/f0000000") == blake3.blake3(b"cafs-file-v1").hexdigest().encode()
    assert cid("dups/copy0") == cid("dups/copy3") == cid("dups/hardlink") \
        == cid("data/copy-of-dups")
    distinct = ("data/big", "data/half-dup", "data/text.txt", "dups/copy0")
    assert len({cid(rel) for rel in distinct}) == len(distinct)


def test_xattr_id_of_a_directory_is_its_node_id(dataset: Dataset, mnt: Mount) -> None:
    repo = Repository.open(open_store(str(dataset.repo)))
    reader = NodeReader(repo, None)
    snap = find_snapshot(repo, "snap")
    assert os.getxattr(mnt.path, "user.cafs.id") == snap.root_id.hex().encode()
    for rel in (b"data", b"empty", b"deep/d00/d01"):
        ref = resolve(reader, snap.root, rel).ref
        assert ref is not None
        path = os.fsencode(mnt.path) + b"/" + rel
        assert os.getxattr(path, "user.cafs.id") == ref.id.hex().encode()


def test_listxattr(dataset: Dataset, mnt: Mount) -> None:
    assert os.listxattr(mnt.path / "data/big") == ["user.cafs.id"]
    assert os.listxattr(mnt.path / "data") == ["user.cafs.id"]
    assert set(os.listxattr(mnt.path)) == {"user.cafs.id", "user.cafs.snapshot", "user.cafs.stats",
                                           "user.cafs.pid", "user.cafs.source", "user.cafs.cache"}
    assert os.getxattr(mnt.path, "user.cafs.snapshot") == b"snap@1"
    assert int(os.getxattr(mnt.path, "user.cafs.pid")) == mnt.pid
    assert os.getxattr(mnt.path, "user.cafs.source") == os.fsencode(dataset.source)
    cache = Path(os.fsdecode(os.getxattr(mnt.path, "user.cafs.cache")))
    assert cache.is_absolute() and list(cache.glob("*/meta.lmdb"))


def test_every_listed_xattr_can_be_read(mnt: Mount) -> None:
    # rsync -X and getfattr -d read each name listxattr gives; the kernel answers ENODATA to
    # a read of user.* on a symlink without asking the mount, so none may be listed there
    root = os.fsencode(mnt.path)
    paths = [root]
    for top, dirs, files in os.walk(root):
        paths.extend(os.path.join(top, name) for name in dirs + files)
    for path in paths:
        for name in os.listxattr(path, follow_symlinks=False):
            assert os.getxattr(path, name, follow_symlinks=False), (path, name)
    assert os.listxattr(mnt.path / "links/relative", follow_symlinks=False) == []


def test_cafs_stats_of_a_mountpoint_lists_every_counter(mnt: Mount, tmp_path: Path) -> None:
    read_file(mnt.path / "data/text.txt")
    as_json = run_cafs("stats", mnt.path, "--json", cache=tmp_path / "c")
    assert as_json.returncode == 0, as_json.stderr
    counters = json.loads(as_json.stdout)
    assert counters["opens"] >= 1 and counters["cache_writes_pending"] >= 0
    text = run_cafs("stats", mnt.path, cache=tmp_path / "c")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert [line.rsplit(None, 1)[0] for line in lines] == [key.replace("_", " ") for key in counters]
    assert len({line.rindex(" ") for line in lines}) == 1  # the values in one column


@pytest.mark.parametrize("rel", ["data", "data/big"])
def test_cafs_stats_of_a_path_inside_a_mount_names_its_mountpoint(mnt: Mount, tmp_path: Path, rel: str) -> None:
    # it said "neither a repository nor a cafs mount" for a directory, and "reading
    # config: Not a directory" for a file, though both are in a cafs mount
    r = run_cafs("stats", mnt.path / rel, cache=tmp_path / "c")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"cafs: {mnt.path / rel}: a path inside the cafs mount at {mnt.path}; "
                                f"its counters: cafs stats {mnt.path}")


def _children(pid: int) -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _ppid(name) == pid]


def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_cafs_stats_of_a_stopped_daemon_says_so_in_bounded_time(dataset: Dataset, tmp_path: Path) -> None:
    # the root's getxattr waited for the daemon's answer: a stopped or hung daemon held
    # 'cafs stats MOUNTPOINT' forever
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(tmp_path / "cache")) as m:
        os.kill(m.pid, signal.SIGSTOP)
        try:
            r = run_cafs("stats", m.path, "--timeout", "0.5", cache=tmp_path / "c", timeout=60)
        finally:
            os.kill(m.pid, signal.SIGCONT)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == (f"cafs: {m.path}: the cafs mount did not answer within 0.5 s (its daemon, "
                                    f"pid {m.pid}, is stopped); unmount it: cafs umount {m.path}")
        assert run_cafs("stats", m.path, cache=tmp_path / "c").returncode == 0


def test_cafs_stats_of_a_mount_whose_daemon_is_gone_says_so(dataset: Dataset, tmp_path: Path) -> None:
    # with fusermount3's auto_unmount helper killed too, kill -9 leaves a dead mount:
    # 'cafs stats' called it "neither a repository nor a cafs mount"
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(tmp_path / "cache")) as m:
        for pid in [*_children(m.pid), m.pid]:
            os.kill(pid, signal.SIGKILL)
        wait_exit(m.pid)
        r = run_cafs("stats", point, cache=tmp_path / "c", timeout=60)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == (f"cafs: {point}: the cafs mount's daemon is gone (Transport endpoint is not "
                                    f"connected); unmount it: cafs umount {point}")


@pytest.mark.parametrize("rel", ["data/big", "data", "links/relative", ""])
def test_unknown_xattr_is_enodata(mnt: Mount, rel: str) -> None:
    with pytest.raises(OSError) as exc:
        os.getxattr(mnt.path / rel, "user.cafs.nope", follow_symlinks=False)
    assert exc.value.errno == errno.ENODATA


# -- read-only --------------------------------------------------------------------------------

FILE = "data/f0000100"


def _open(rel: str, flags: int) -> Callable[[Path], object]:
    def op(m: Path) -> None:
        os.close(os.open(m / rel, flags, 0o644))

    return op


WRITES: dict[str, Callable[[Path], object]] = {
    "open-wronly": _open(FILE, os.O_WRONLY),
    "open-rdwr": _open(FILE, os.O_RDWR),
    "open-append": _open(FILE, os.O_WRONLY | os.O_APPEND),
    "open-trunc": _open(FILE, os.O_RDONLY | os.O_TRUNC),
    "create": _open("data/new-file", os.O_WRONLY | os.O_CREAT),
    "create-excl": _open("new-file", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    "mkdir": lambda m: os.mkdir(m / "new-dir"),
    "mkfifo": lambda m: os.mkfifo(m / "new-fifo"),
    "unlink": lambda m: os.unlink(m / FILE),
    "rmdir": lambda m: os.rmdir(m / "empty"),
    "rename": lambda m: os.rename(m / FILE, m / "data/renamed"),
    "rename-dir": lambda m: os.rename(m / "empty", m / "data/empty"),
    "symlink": lambda m: os.symlink("target", m / "new-link"),
    "link": lambda m: os.link(m / FILE, m / "data/new-link"),
    "chmod": lambda m: os.chmod(m / FILE, 0o600),
    "chown": lambda m: os.chown(m / FILE, 1234, 1234),
    "utime": lambda m: os.utime(m / FILE, ns=(1, 1)),
    "truncate": lambda m: os.truncate(m / FILE, 0),
    "setxattr": lambda m: os.setxattr(m / FILE, "user.test", b"1"),
    "removexattr": lambda m: os.removexattr(m / FILE, "user.cafs.id"),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_writes_fail_with_erofs(mnt: Mount, name: str) -> None:
    before = os.lstat(mnt.path / FILE)
    with pytest.raises(OSError) as exc:
        WRITES[name](mnt.path)
    assert exc.value.errno == errno.EROFS, exc.value
    after = os.lstat(mnt.path / FILE)
    assert (after.st_mode, after.st_size, after.st_mtime_ns) == \
        (before.st_mode, before.st_size, before.st_mtime_ns)


def test_append_without_write_access_is_a_read_only_open(dataset: Dataset, mnt: Mount) -> None:
    fd = os.open(mnt.path / FILE, os.O_RDONLY | os.O_APPEND)
    try:
        assert os.read(fd, 1 << 20) == read_file(dataset.src / FILE)
    finally:
        os.close(fd)


# -- concurrency ------------------------------------------------------------------------------


def _regular_files(src: Path) -> dict[str, str]:
    """relative path (str) -> SHA-256 of every regular file of the tree."""
    return {os.fsdecode(rel): item.digest for rel, item in manifest(src).items()
            if item.kind == "f" and item.digest is not None}


def test_threads_read_same_and_different_files(dataset: Dataset, fresh_mount: Mount) -> None:
    files = _regular_files(dataset.src)
    big_data = read_file(dataset.src / "data/big")
    start = threading.Barrier(8)

    def worker(seed: int) -> int:
        rnd = random.Random(seed)
        order = sorted(files)
        rnd.shuffle(order)
        start.wait(timeout=60)
        checked = 0
        with open(fresh_mount.path / "data/big", "rb", buffering=0) as big:
            for rel in order:
                assert sha(read_file(fresh_mount.path / rel)) == files[rel], rel
                for _ in range(3):
                    off, n = rnd.randrange(len(big_data)), rnd.randrange(1, 300_000)
                    assert os.pread(big.fileno(), n, off) == big_data[off:off + n], (off, n)
                checked += 1
        return checked

    with ThreadPoolExecutor(8) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(worker, s) for s in range(8)]]
    assert results == [len(files)] * 8
    assert fresh_mount.stats()["errors"] == 0


def _check_reads(seed: int, fds: dict[str, int], sources: dict[str, bytes], own: list[str],
                 digests: dict[str, str], root: str) -> list[str]:
    """Random preads on already open descriptors, then whole reads of files opened
    here; returns what did not match."""
    problems = []
    rnd = random.Random(seed)
    for _ in range(300):
        rel = rnd.choice(sorted(fds))
        data = sources[rel]
        off, n = rnd.randrange(len(data) + 10), rnd.randrange(1, 200_000)
        if os.pread(fds[rel], n, off) != data[off:off + n]:
            problems.append(f"pread {rel} {off}+{n}")
    for rel in own:
        if sha(read_file(Path(root) / rel)) != digests[rel]:
            problems.append(f"read {rel}")
    return problems


def _fork_child(conn: Connection, *args: Any) -> None:
    try:
        problems = _check_reads(*args)
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which fails the test)
        problems = [repr(exc)]
    conn.send(problems)
    conn.close()


def test_forked_processes_read_through_inherited_descriptors(dataset: Dataset,
                                                             fresh_mount: Mount) -> None:
    ctx = multiprocessing.get_context("fork")
    shared = ["data/big", "data/half-dup", "data/text.txt", "data/sparse", "dups/copy0"]
    digests = _regular_files(dataset.src)
    others = sorted(set(digests) - set(shared))
    sources = {rel: read_file(dataset.src / rel) for rel in shared}
    root = str(fresh_mount.path)
    fds = {rel: os.open(fresh_mount.path / rel, os.O_RDONLY) for rel in shared}
    pipes = [ctx.Pipe(duplex=False) for _ in range(4)]
    procs = [ctx.Process(target=_fork_child,
                         args=(send, seed, fds, sources, others[seed::4], digests, root))
             for seed, (_recv, send) in enumerate(pipes)]
    try:
        for p in procs:
            p.start()  # forked after the descriptors were opened, like DataLoader workers
        for _recv, send in pipes:
            send.close()
        assert _check_reads(99, fds, sources, others, digests, root) == []  # the parent too
        for seed, (recv, _send) in enumerate(pipes):
            assert recv.poll(120), f"worker {seed} did not report"
            assert recv.recv() == [], f"worker {seed}"
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * 4
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        for fd in fds.values():
            os.close(fd)
        for recv, _send in pipes:
            recv.close()
    assert fresh_mount.stats()["errors"] == 0


# -- the chunk cache --------------------------------------------------------------------------


def _random_tree(root: Path, total: int, seed: int) -> None:
    rnd = random.Random(seed)
    sizes = [5 * MiB + 3, 4 * MiB, 3 * MiB + 999, 2 * MiB, MiB + 1, 700_000, 300_000, 65_536,
             100, 1]
    root.mkdir()
    i = 0
    while total > 0:
        d = root / f"d{i % 3}"
        d.mkdir(exist_ok=True)
        size = min(total, sizes[i % len(sizes)])
        (d / f"f{i:03d}").write_bytes(rnd.randbytes(size))
        total -= size
        i += 1


def test_cache_stays_within_its_limit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _random_tree(src, 40 * MiB, seed=5)
    repo = make_repo(tmp_path / "repo", tmp_path / "import-cache", pack_size="1M")
    source = import_tree(src, repo, "rand", tmp_path / "import-cache")
    cache = tmp_path / "cache"
    with mounted(source, new_mountpoint(tmp_path), full_cache(cache, "8M")) as m:
        assert_same_tree(src, m.path)
        s = m.stats()
    assert s["cache_limit"] == 8 * MiB
    assert s["bytes_fetched"] >= 40 * MiB
    assert s["evictions"] > 0
    assert s["cache_size"] <= 8 * MiB  # eviction is in the inserting transaction
    assert s["errors"] == s["cache_full"] == 0
    # the recorded size is the sum of the extents, and every extent verifies
    r = run_cafs("fsck", repo, "--cache", cache, cache=cache)
    assert r.returncode == 0, r.stdout + r.stderr
    # Evicted extents are punched out of the sparse files, with the blocks they shared
    # with each other; without punching, all 40 MiB would stay.
    allocated = sum(p.stat().st_blocks * 512 for p in cache.glob("*/data/*/*"))
    assert allocated <= 9 * MiB


@contextmanager
def _tmpfs(point: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``point`` for the block; always unmounted. A cache there holds
    the daemon's stderr (mountd.stderr), inherited by libfuse's auto_unmount helper
    (fusermount3), which may outlive the daemon for a moment: the disk is busy until then."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True, timeout=60)
    try:
        yield point
    finally:
        poll(lambda: not os.path.ismount(point)
             or subprocess.run(["umount", str(point)], capture_output=True, check=False, timeout=60).returncode == 0,
             30, f"{point} to be unmounted")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 2 MiB at a new directory, for a cache whose disk fills; always unmounted."""
    with _tmpfs(new_mountpoint(tmp_path, "small-disk"), "2m") as point:
        yield point


def _age_extents(cache_root: Path, seconds: int) -> None:
    """Make every extent of the cache at ``cache_root`` look last used ``seconds`` ago."""
    meta = MetaCache(cache_root)
    try:
        with meta.env.begin(write=True) as txn:
            extents = meta.env.open_db(b"extents", txn=txn)
            for key, value in list(txn.cursor(db=extents)):
                length, when = struct.unpack(">IQ", value)
                txn.put(key, struct.pack(">IQ", length, when - seconds), db=extents)
    finally:
        meta.close()


def test_a_cache_limit_larger_than_its_disk_keeps_the_chunks_read_last(tmp_path: Path) -> None:
    # the disk filled long before the limit: the insert that met ENOSPC turned caching off
    # (30 s at a time, again and again), so the cache kept the first chunks ever read and
    # took no later one; the least recently used must make room instead
    rnd = random.Random(3)
    cache = tmp_path / "import-cache"
    repo = make_repo(tmp_path / "repo", cache)
    sources = {}
    for name, size in (("old", 6 * MiB), ("new", 3 * MiB)):  # 9 MiB, on a disk of 8
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_bytes(rnd.randbytes(size))
        sources[name] = import_tree(tmp_path / name, repo, name, cache)
    point = new_mountpoint(tmp_path)
    with _tmpfs(new_mountpoint(tmp_path, "disk"), "8m") as disk:
        options = full_cache(disk, "1G")
        with mounted(sources["old"], point, options) as m:
            assert read_file(m.path / "f") == read_file(tmp_path / "old" / "f")
        _age_extents(disk / Repository.open(open_store(str(repo))).config.repo_id, 3600)
        with mounted(sources["new"], point, options) as m:
            assert read_file(m.path / "f") == read_file(tmp_path / "new" / "f")
            poll(lambda: m.stats()["cache_writes_pending"] == 0, 30, "the cache writes behind the reads")
            s = m.stats()
            assert s["cache_full"] == s["errors"] == 0 and s["evictions"] > 0
        with mounted(sources["new"], point, options) as m:
            assert read_file(m.path / "f") == read_file(tmp_path / "new" / "f")
            assert m.stats()["bytes_fetched"] == 0




def test_a_full_cache_disk_keeps_no_bytes_the_cache_does_not_record(dataset: Dataset, small_disk: Path,
                                                                     tmp_path: Path) -> None:
    # an insert that fails for lack of space has written part of its bytes: nothing records
    # them, so no eviction would free them, and the disk would stay full of them
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(small_disk), expect_warnings=True) as m:
        assert read_file(m.path / "data/big") == read_file(dataset.src / "data/big")
        poll(lambda: m.stats()["cache_writes_pending"] == 0, 30, "the cache writes behind the reads")
        s = m.stats()
        allocated = sum(p.stat().st_blocks * 512 for p in small_disk.glob("*/data/*/*"))
        assert s["cache_full"] >= 1 and s["errors"] == 0
        assert allocated <= s["cache_size"] + 64 * 4096, (allocated, s["cache_size"])
    assert m.log_problems() and all("no space left on device" in line for line in m.log_problems())


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last block."""
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while f.write(bytes(4096)):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def _compact(cache: Path) -> None:
    """Leave each LMDB file of the caches in ``cache`` without free pages, so that its next
    write must grow it: else a commit on a full disk may fit in pages an earlier one
    freed, and whether it fails depends on how many commits the mount before made."""
    import lmdb

    for env_dir in cache.glob("*/meta.lmdb"):
        copy = env_dir.parent / "compact.tmp"
        copy.mkdir()
        env = lmdb.open(str(env_dir), max_dbs=8)
        try:
            env.copy(str(copy), compact=True)
        finally:
            env.close()
        os.replace(copy / "data.mdb", env_dir / "data.mdb")
        copy.rmdir()


def test_a_mount_reading_its_cache_on_a_full_disk_keeps_serving(dataset: Dataset, small_disk: Path,
                                                                 tmp_path: Path) -> None:
    # every few seconds the daemon records when the cached chunks it read were last used;
    # on a full disk that LMDB commit fails, and the daemon died of it, its mount with it
    rels = ["data/text.txt", "data/f0004096", "data/f0016384", "data/half-dup"]
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(small_disk, "1M")) as m:
        assert [read_file(m.path / rel) for rel in rels] == [read_file(dataset.src / rel) for rel in rels]
    _compact(small_disk)
    _fill(small_disk)
    with mounted(dataset.source, point, full_cache(small_disk, "1M"), expect_warnings=True) as m:
        for rel in rels:
            assert read_file(m.path / rel) == read_file(dataset.src / rel)
        said = "cannot record when cached chunks were used"
        poll(lambda: said in "".join(m.log_problems()) or not process_alive(m.pid), 30,
             "a flush of the last-use times")
        assert process_alive(m.pid) and is_mounted(point)
        assert m.stats()["cache_hits"] > 0
        assert read_file(m.path / "data/big") == read_file(dataset.src / "data/big")
    assert sum(said in line for line in m.log_problems()) == 1  # not again at each flush
    assert all("no space left" in line for line in m.log_problems())


@pytest.fixture(scope="module")
def many_packs(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """A snapshot of 160 files of 24 KiB in packs of 64 KiB: about 60 packs."""
    base = tmp_path_factory.mktemp("many-packs")
    rnd = random.Random(7)
    src = base / "src"
    for i in range(160):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i:03d}").write_bytes(rnd.randbytes(24 << 10))
    repo = make_repo(base / "repo", base / "import-cache", pack_size="64K")
    source = import_tree(src, repo, "packs", base / "import-cache")
    assert len([p for p in (repo / "packs").rglob("*") if p.is_file()]) > 50
    return Dataset(src, repo, source, base / "import-cache")


@pytest.mark.parametrize("mode", ["full", "meta"])
def test_a_mount_under_a_low_open_files_limit_serves_every_read(many_packs: Dataset, tmp_path: Path,
                                                                mode: str) -> None:
    # the pools of pack files kept open (up to 256 cache files, each open twice, and 64 of
    # the repository) must fit in the limit the daemon was started with
    files = _regular_files(many_packs.src)
    options = f"cache={tmp_path / 'cache'},cache_mode={mode}"
    with mounted(many_packs.source, new_mountpoint(tmp_path), options, open_files=64) as m:
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(files, pool.map(lambda rel: sha(read_file(m.path / rel)), files)))
        assert got == files
        assert m.stats()["errors"] == 0


def _damage_cache_files(cache: Path) -> int:
    """Flip one byte in every 512 of every cache file; returns how many files."""
    files = list(cache.glob("*/data/*/*"))
    for path in files:
        data = bytearray(path.read_bytes())
        for i in range(0, len(data), 512):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    return len(files)


def test_a_mount_under_a_limit_of_address_space_serves_reads(dataset: Dataset, tmp_path: Path) -> None:
    # the metadata cache reserved 1 TiB of addresses for its map: under 'ulimit -v 4G'
    # (shared clusters set one) the mount failed, 'cannot open the metadata cache ...:
    # Cannot allocate memory', and so did every other command
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(tmp_path / "cache"), address_space=4 << 30) as m:
        assert read_file(m.path / "data/big") == read_file(dataset.src / "data/big")


def test_damaged_cache_is_detected_and_refetched(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rels = ["data/big", "data/text.txt", "data/half-dup"]
    want = {rel: read_file(dataset.src / rel) for rel in rels}
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(cache)) as m:
        assert {rel: read_file(m.path / rel) for rel in rels} == want
        assert m.stats()["bytes_fetched"] > 0
    assert _damage_cache_files(cache) > 0
    with mounted(dataset.source, point, full_cache(cache), expect_warnings=True) as m:
        assert {rel: read_file(m.path / rel) for rel in rels} == want
        s = m.stats()
        assert s["damaged_extents"] > 0 and s["cache_misses"] > 0 and s["errors"] == 0
    assert all("cache extent damaged" in line for line in m.log_problems())
    with mounted(dataset.source, point, full_cache(cache)) as m:  # repaired in passing
        assert {rel: read_file(m.path / rel) for rel in rels} == want
        s = m.stats()
        assert s["damaged_extents"] == s["bytes_fetched"] == 0


# -- the daemon's life ------------------------------------------------------------------------


def test_kill_9_leaves_no_mount_and_the_cache_intact(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    point = new_mountpoint(tmp_path)
    want = read_file(dataset.src / "data/big")
    with mounted(dataset.source, point, full_cache(cache)) as m:
        assert read_file(m.path / "data/big") == want
        assert m.stats()["bytes_fetched"] > 0
        poll(lambda: m.stats()["cache_writes_pending"] == 0, 30, "the cache writes behind the reads")
        os.kill(m.pid, signal.SIGKILL)
        poll(lambda: not is_mounted(point), 30, f"{point} to be unmounted after kill -9")
        wait_exit(m.pid)
    assert os.listdir(point) == [] and not os.path.ismount(point)
    with mounted(dataset.source, point, full_cache(cache)) as m:
        assert read_file(m.path / "data/big") == want
        s = m.stats()
        assert s["bytes_fetched"] == 0 and s["cache_hits"] > 0


def test_the_daemon_keeps_no_hold_on_the_directory_it_was_started_from(dataset: Dataset, tmp_path: Path) -> None:
    # the daemon kept the mount helper's working directory as its own for as long as it
    # served: 'cd /mnt/usb; mount -t cafs ...' left /mnt/usb (or another cafs mount)
    # impossible to unmount, 'target is busy'
    point = new_mountpoint(tmp_path)
    with _tmpfs(new_mountpoint(tmp_path, "started-here"), "1m") as here:
        source = os.path.relpath(dataset.repo, here) + "#snap"  # relative paths still work
        options = f"cache={os.path.relpath(tmp_path / 'cache', here)},cache_mode=full"
        with mounted(source, point, options, cwd=here) as m:
            r = subprocess.run(["umount", str(here)], capture_output=True, text=True, timeout=60, check=False)
            assert r.returncode == 0, r.stderr
            assert read_file(m.path / FILE) == read_file(dataset.src / FILE)
            assert m.stats()["bytes_fetched"] > 0 and (tmp_path / "cache" / _repo_id(dataset)).is_dir()


def test_a_mount_started_with_standard_descriptors_closed(dataset: Dataset, tmp_path: Path) -> None:
    # started with descriptors 0-2 closed, the helper's pipe for the daemon's "ok" took
    # numbers 0 and 1, the daemon's stdout (/dev/null) took the place of the pipe's end
    # in the child, and a mount that came up was reported failed (exit 32) and killed
    point = new_mountpoint(tmp_path)
    log = tmp_path / "mount.log"
    helper = [sys.executable, "-m", "cafs.mount_helper", dataset.source, str(point), "-o",
              f"{full_cache(tmp_path / 'cache')},log={log}"]
    try:
        r = subprocess.run(["sh", "-c", 'exec "$@" <&- >&- 2>&-', "sh", *helper], env=env(),
                           timeout=120, check=False)
        assert r.returncode == 0, (tmp_path / "cache" / "mountd.stderr").read_text()
        assert read_file(point / FILE) == read_file(dataset.src / FILE)
    finally:
        unmount(point, mountd_pids(point))
    assert " WARNING " not in log.read_text()


@pytest.mark.parametrize("command", ["mount.cafs", "cafs umount"])
def test_relative_paths_from_a_deleted_directory_are_one_line(dataset: Dataset, tmp_path: Path,
                                                              command: str) -> None:
    # run from a directory deleted meanwhile, a relative repository or mountpoint ended
    # mount.cafs with a FileNotFoundError traceback from os.getcwd(), and cafs umount said
    # 'cafs: standard output: No such file or directory'
    point = new_mountpoint(tmp_path)
    gone = tmp_path / "gone"
    gone.mkdir()
    args = {"mount.cafs": ["-m", "cafs.mount_helper", os.path.relpath(dataset.source, gone), str(point),
                           "-o", f"cache={tmp_path / 'cache'},log={tmp_path / 'mount.log'}"],
            "cafs umount": ["-m", "cafs.cli", "umount", os.path.relpath(point, gone)]}[command]
    try:
        r = subprocess.run(["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone),
                            sys.executable, *args], capture_output=True, text=True, env=env(), timeout=60,
                           check=False)
        assert (r.returncode, r.stderr) == (1, f"{command.split()[0]}: the current directory was deleted, so "
                                               "relative paths name nothing: cd elsewhere or give absolute paths\n")
        assert not is_mounted(point)
    finally:
        unmount(point, mountd_pids(point))


def test_a_rotated_log_is_made_anew(dataset: Dataset, tmp_path: Path) -> None:
    # logrotate moves the log aside and expects the next line in a new file at its path:
    # the daemon wrote on into the moved file, which logrotate then compresses and deletes
    log = tmp_path / "mount.log"
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, f"{full_cache(tmp_path / 'cache')},log={log}") as m:
        log.rename(tmp_path / "mount.log.1")
        os.kill(m.pid, signal.SIGTERM)
        wait_exit(m.pid)
    assert f"unmounted {point}" in log.read_text()
    assert f"unmounted {point}" not in (tmp_path / "mount.log.1").read_text()


def test_a_deleted_log_directory_is_made_anew_and_the_mount_serves_on(dataset: Dataset, tmp_path: Path) -> None:
    # with the log's directory deleted (rm -rf, a cleaner of old files), the next line
    # logged raised FileNotFoundError into the daemon: the mount was gone
    log = tmp_path / "logs" / "mount.log"
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, f"{full_cache(tmp_path / 'cache')},log={log}") as m:
        shutil.rmtree(log.parent)
        os.kill(m.pid, signal.SIGUSR1)
        poll(log.exists, 30, "the log to be made anew")
        assert read_file(m.path / FILE) == read_file(dataset.src / FILE)
        assert process_alive(m.pid) and "counters {" in log.read_text()


def test_a_daemon_killed_by_a_fatal_signal_leaves_its_traceback(dataset: Dataset, tmp_path: Path) -> None:
    # LMDB maps the cache's file: truncated under a running mount, the daemon's next lookup
    # is a SIGBUS, which kills it with no exception to log; nothing anywhere said why it died
    cache = tmp_path / "cache"
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(cache)) as m:
        os.truncate(cache / _repo_id(dataset) / "meta.lmdb" / "data.mdb", 4096)
        with pytest.raises(OSError):
            read_file(m.path / "data/big")
        wait_exit(m.pid)
    said = (cache / "mountd.stderr").read_text()
    assert "Fatal Python error: Bus error" in said and ("chunkcache.py" in said or "metacache.py" in said), said


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mount.cafs: "), stderr
    return lines[0]


@pytest.mark.parametrize("case", ["unknown option", "malformed cache_size", "huge cache_size", "missing repository",
                                  "missing snapshot", "no snapshot named", "missing mountpoint",
                                  "option given twice", "invalid ref name", "mirror port out of range",
                                  "mirror without a host", "mirror of another repository",
                                  "mirror that is no repository"])
def test_mount_errors(dataset: Dataset, tmp_path: Path, case: str) -> None:
    point = new_mountpoint(tmp_path)
    cache = f"cache={tmp_path / 'cache'}"
    Repository.init(open_store(str(tmp_path / "other")))
    source, target, options, code, says = {
        "unknown option": (dataset.source, point, f"{cache},bogus=1", 1, "bogus"),
        "malformed cache_size": (dataset.source, point, f"{cache},cache_size=lots", 1,
                                 "cache_size"),
        "huge cache_size": (dataset.source, point, f"{cache},cache_size=20000000T", 1, "cache_size"),
        "missing repository": (f"{tmp_path / 'nothing'}#snap", point, cache, 32, "nothing"),
        "missing snapshot": (f"{dataset.repo}#nosuch", point, cache, 32, "nosuch"),
        "no snapshot named": (str(dataset.repo), point, cache, 1, "REPO#NAME"),
        "missing mountpoint": (dataset.source, tmp_path / "absent", cache, 32, "absent"),
        "option given twice": (dataset.source, point, f"{cache},cache_mode=full,cache_mode=meta", 1,
                               "cache_mode given twice"),
        "invalid ref name": (f"{dataset.repo}#sp ace", point, cache, 1, "invalid ref name"),
        "mirror port out of range": (dataset.source, point, f"{cache},mirror=http://127.0.0.1:99999/m", 1,
                                     "http://127.0.0.1:99999/m: not a valid URL"),
        "mirror without a host": (dataset.source, point, f"{cache},mirror=http:///m", 1,
                                  "http:///m: no host in the URL"),
        # a mirror answers the names the repository lacks: another one's refs would be taken
        "mirror of another repository": (dataset.source, point, f"{cache},mirror={tmp_path / 'other'}", 1,
                                         f"mirror file://{tmp_path / 'other'} holds another repository"),
        "mirror that is no repository": (dataset.source, point, f"{cache},mirror={tmp_path / 'typo'}", 1,
                                         f"mirror file://{tmp_path / 'typo'}: not a cafs repository"),
    }[case]
    r = run_mount_helper(source, target, options)
    try:
        assert r.returncode == code, r.stderr
        assert says in _one_line(r.stderr)
        assert cafs_mounts(tmp_path) == []
        assert mountd_pids(target) == []
    finally:
        unmount(target, mountd_pids(target))


def test_an_option_given_twice_with_one_value_is_accepted(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    options = f"{full_cache(cache)},cache_mode=full,cache={cache}/"
    with mounted(dataset.source, new_mountpoint(tmp_path), options) as m:
        assert read_file(m.path / FILE) == read_file(dataset.src / FILE)
        assert m.stats()["cache_limit"] == 256 * MiB  # cache_mode=full: a chunk cache


def test_generic_options_mount8_hands_on_are_accepted(dataset: Dataset, tmp_path: Path) -> None:
    # as 'mount -t cafs' passes them from fstab or -o (the context= family on SELinux hosts,
    # a value with commas in double quotes)
    cache = tmp_path / "cache, v2"
    options = ('rw,nodiratime,_rnetdev,silent,iversion,dirsync,mand,norelatime,'
               f'context="system_u:object_r:container_file_t:s0:c1,c2",cache="{cache}",cache_mode=full')
    with mounted(dataset.source, new_mountpoint(tmp_path), options) as m:
        assert read_file(m.path / FILE) == read_file(dataset.src / FILE)
        assert os.getxattr(m.path, "user.cafs.cache") == os.fsencode(cache)


def test_cafs_mount_uses_the_cache_its_cache_option_names(dataset: Dataset, tmp_path: Path) -> None:
    # 'cafs mount --cache DIR' (the --cache every command takes) was accepted and ignored:
    # the mount used the default cache directory, filling a disk the user did not name
    cache, default = tmp_path / "named, cache", tmp_path / "default-cache"
    mnt = new_mountpoint(tmp_path)
    r = run_cafs("mount", "--cache", cache, dataset.source, mnt, "-o", f"log={tmp_path / 'mnt.log'}", cache=default)
    try:
        assert r.returncode == 0, r.stderr
        assert os.getxattr(mnt, "user.cafs.cache") == os.fsencode(cache)
        assert read_file(mnt / FILE) == read_file(dataset.src / FILE)
    finally:
        unmount(mnt, mountd_pids(mnt))
    assert not default.exists()
    r = run_cafs("mount", "--cache", cache, dataset.source, mnt, "-o", f"cache={default}", cache=default)
    assert r.returncode == 1 and "mount option cache given twice with different values" in r.stderr, r.stderr
    assert not is_mounted(mnt)


def test_a_source_starting_with_a_dash_mounts(dataset: Dataset, tmp_path: Path) -> None:
    # the daemon was started as 'mountd --ready-fd N SOURCE MNT -o ...': a SOURCE such as
    # '-repo#snap' (a repository at a relative path) was taken for an option, and the
    # daemon exited with a usage message in mountd.stderr (mount exit 32)
    (tmp_path / "-repo").symlink_to(dataset.repo)
    mnt = new_mountpoint(tmp_path)
    source = "-repo#" + dataset.source.partition("#")[2]
    r = run_cafs("mount", "-o", f"log={tmp_path / 'mnt.log'}", "--", source, mnt, cache=tmp_path / "cache",
                 cwd=tmp_path)
    try:
        assert r.returncode == 0, r.stderr
        assert read_file(mnt / FILE) == read_file(dataset.src / FILE)
    finally:
        unmount(mnt, mountd_pids(mnt))


def test_proc_mounts_shows_the_source_as_given(dataset: Dataset, tmp_path: Path) -> None:
    # mount(8) takes an fstab line as mounted already only if /proc/mounts shows its source
    # as written: else a second 'mount -a' mounts it again, and fails as busy
    odd = tmp_path / "runs, v2\\b"
    odd.symlink_to(dataset.repo)
    source = f"{odd}#snap"
    with mounted(source, new_mountpoint(tmp_path), full_cache(tmp_path / "cache")) as m:
        assert [e.source for e in cafs_mounts(tmp_path)] == [source]
        assert read_file(m.path / FILE) == read_file(dataset.src / FILE)


def test_noexec_is_honoured(dataset: Dataset, mnt: Mount, tmp_path: Path) -> None:
    script = "modes/exec"  # 0o755, "#!/bin/sh" and exit 0
    assert subprocess.run([mnt.path / script], check=False).returncode == 0
    with mounted(dataset.source, new_mountpoint(tmp_path), f"{full_cache(tmp_path / 'cache')},noexec") as m:
        assert "noexec" in next(e for e in cafs_mounts() if e.mountpoint == str(m.path)).options.split(",")
        with pytest.raises(PermissionError):
            subprocess.run([m.path / script], check=False)
        assert read_file(m.path / script) == read_file(dataset.src / script)


def _repo_id(dataset: Dataset) -> str:
    return Repository.open(open_store(str(dataset.repo))).config.repo_id


@pytest.mark.parametrize("foreground", [False, True])
@pytest.mark.parametrize("case", ["cache under a file", "cache subdirectory is a file"])
def test_unusable_cache_directory_is_a_clear_error(dataset: Dataset, tmp_path: Path, case: str,
                                                    foreground: bool) -> None:
    point = new_mountpoint(tmp_path)
    (tmp_path / "afile").write_bytes(b"not a directory")
    if case == "cache under a file":
        cache, says = tmp_path / "afile" / "cache", "cache"
    else:
        cache, says = tmp_path / "cache", "metadata cache"
        cache.mkdir()
        (cache / _repo_id(dataset)).write_bytes(b"where the repository's cache goes")
    options = f"cache={cache}"
    args = [sys.executable, "-m", "cafs.mount_helper", dataset.source, str(point), "-o", options]
    r = subprocess.run(args + (["-f"] if foreground else []), capture_output=True, text=True,
                       timeout=120, check=False, env=env())
    try:
        assert r.returncode == 32, r.stderr
        assert says in _one_line(r.stderr) and "Traceback" not in r.stderr
        assert cafs_mounts(tmp_path) == []
    finally:
        unmount(point, mountd_pids(point))


@pytest.mark.parametrize("option", ["cache", "log"])
def test_a_file_where_the_cache_or_log_directory_goes_is_named(dataset: Dataset, tmp_path: Path,
                                                                option: str) -> None:
    point = new_mountpoint(tmp_path)
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a directory")
    options = f"cache={afile}" if option == "cache" else f"cache={tmp_path / 'cache'},log={afile / 'mount.log'}"
    r = run_mount_helper(dataset.source, point, options)
    try:
        assert r.returncode == 32, r.stderr
        line = _one_line(r.stderr)
        assert f"{afile} is not a directory" in line and line.startswith(f"mount.cafs: {option}")
        assert cafs_mounts(tmp_path) == [] and mountd_pids(point) == []
    finally:
        unmount(point, mountd_pids(point))


@pytest.mark.parametrize("option", ["cache", "log"])
def test_a_cache_or_log_inside_the_mountpoint_is_refused(dataset: Dataset, tmp_path: Path, option: str) -> None:
    # the daemon opened them before it mounted, then looked for new cache files through its
    # own read-only mount: the mount came up and never cached a chunk ("Read-only file
    # system; serving without caching" every 30 s), and its log was hidden beneath it
    point = new_mountpoint(tmp_path)
    inside = point / "sub" / ".." / "inner"
    options = f"cache={inside}" if option == "cache" else f"cache={tmp_path / 'cache'},log={inside / 'mount.log'}"
    r = run_mount_helper(dataset.source, point, options)
    try:
        assert r.returncode == 1, r.stderr
        assert _one_line(r.stderr) == (f"mount.cafs: {option}={inside}{'/mount.log' if option == 'log' else ''} "
                                       f"is inside the mountpoint {point}; put it outside")
        assert cafs_mounts(tmp_path) == [] and mountd_pids(point) == []
    finally:
        unmount(point, mountd_pids(point))


def test_a_damaged_metadata_cache_is_set_aside(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    meta = cache / _repo_id(dataset) / "meta.lmdb"
    meta.mkdir(parents=True)
    (meta / "data.mdb").write_bytes(os.urandom(64 << 10))
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(cache), expect_warnings=True) as m:
        assert_same_tree(dataset.src, m.path, symlink_mtimes=True)
    assert list((cache / _repo_id(dataset)).glob("meta.lmdb.damaged-*"))


def _take_every_reader_slot(lmdb_dir: Path) -> None:
    """What processes killed inside LMDB read transactions (kill -9, the OOM killer, of a
    busy mount or prefetch) leave behind: their slots in LMDB's reader table (126) stay
    taken as long as another process keeps the file open. Here one process begins read
    transactions until the table is full, and is killed."""
    code = ("import lmdb, os, signal\n"
            f"env = lmdb.open({os.fspath(lmdb_dir)!r}, max_dbs=8, map_size=1 << 40)\n"
            "txns = []\n"
            "try:\n"
            "    while True:\n"
            "        txns.append(env.begin())\n"
            "except lmdb.ReadersFullError:\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -signal.SIGKILL


def test_reader_slots_of_killed_processes_are_freed_by_a_mount(dataset: Dataset, tmp_path: Path) -> None:
    """Once killed processes held every reader slot of a cache a mount kept open, every
    command using that cache failed ('cannot open the metadata cache: MDB_READERS_FULL'),
    another mount of the repository too, until the mount was gone. The mount now frees
    the slots of dead processes as it flushes its cache records."""
    cache = tmp_path / "cache"
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(cache)) as m:
        assert read_file(m.path / "data/text.txt") == read_file(dataset.src / "data/text.txt")
        _take_every_reader_slot(cache / _repo_id(dataset) / "meta.lmdb")
        poll(lambda: run_cafs("ls", dataset.source, "--cache", cache, cache=cache).returncode == 0, 60,
             "cafs ls to open the cache again")
        assert read_file(m.path / "data/big") == read_file(dataset.src / "data/big")


def test_a_cache_held_open_reads_on_once_killed_processes_took_every_reader_slot(tmp_path: Path) -> None:
    """A process that holds the cache (an import, a mount) and meets a full reader table
    frees the slots of dead processes and reads on, rather than giving up its cache."""
    node = b"node bytes"
    meta = MetaCache(tmp_path / "cache")
    try:
        meta.put_many([(blake3.blake3(node).digest(), node)])
        _take_every_reader_slot(tmp_path / "cache" / "meta.lmdb")
        assert meta.get(blake3.blake3(node).digest()) == node
    finally:
        meta.close()


def test_mount_on_a_busy_mountpoint_fails(dataset: Dataset, tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(tmp_path / "cache")) as m:
        r = run_mount_helper(dataset.source, point, full_cache(tmp_path / "cache2"))
        assert r.returncode == 32, r.stderr
        assert "busy" in _one_line(r.stderr)
        assert [e.mountpoint for e in cafs_mounts(tmp_path)] == [str(point)]
        assert mountd_pids(point) == [m.pid]
        assert read_file(m.path / "data/f0000100") == read_file(dataset.src / "data/f0000100")


def test_of_mounts_started_at_once_on_one_mountpoint_one_is_made(dataset: Dataset, tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    options = f"{full_cache(tmp_path / 'cache')},log={tmp_path / 'mount.log'}"
    args = [sys.executable, "-m", "cafs.mount_helper", dataset.source, str(point), "-o", options]
    helpers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
               for _ in range(3)]
    try:
        results = [(h.wait(timeout=120), h.communicate()[1]) for h in helpers]
        assert sorted(code for code, _err in results) == [0, 32, 32], results
        for _code, err in (r for r in results if r[0] != 0):
            assert f"{point}: mountpoint is busy" in _one_line(err)
        assert [e.mountpoint for e in cafs_mounts(tmp_path)] == [str(point)]
        assert len(mountd_pids(point)) == 1
        assert read_file(point / FILE) == read_file(dataset.src / FILE)
    finally:
        for h in helpers:
            if h.poll() is None:
                h.kill()
                h.wait()
        pids = mountd_pids(point)
        for _ in helpers[1:]:  # mounts stacked by a helper that failed to refuse: one layer each
            unmount(point, [])
        unmount(point, pids)
    assert not is_mounted(point)


def _deleted_files_open(pid: int, under: Path) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    targets = [os.readlink(fds / name) for name in os.listdir(fds)]
    return [t for t in targets if t.startswith(str(under)) and t.endswith(" (deleted)")]


def test_cache_clear_refuses_a_cache_a_mount_uses(dataset: Dataset, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    point = new_mountpoint(tmp_path)
    root = cache / _repo_id(dataset)
    with mounted(dataset.source, point, full_cache(cache)) as m:
        assert read_file(m.path / "data/big") == read_file(dataset.src / "data/big")
        r = run_cafs("cache", "clear", "--cache", cache, cache=cache)
        assert r.returncode == 1, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and "nothing deleted" in line and f"the mount at {point} (pid {m.pid})" in line
        assert (root / "meta.lmdb").is_dir() and any((root / "data").glob("*/*"))
        assert _deleted_files_open(m.pid, cache) == []
        assert read_file(m.path / FILE) == read_file(dataset.src / FILE)
    r = run_cafs("cache", "clear", "--cache", cache, cache=cache)
    assert r.returncode == 0, r.stderr
    assert not root.exists()


def test_cache_clear_refuses_a_cache_a_cafs_without_its_lock_uses(dataset: Dataset, tmp_path: Path) -> None:
    # a mount started by a cafs older than the in-use lock, still serving after an
    # upgrade: it has meta.lmdb open, nothing more (as this child does); clear deleted
    # the cache under it, which went on writing into deleted files
    cache = tmp_path / "cache"
    root = cache / _repo_id(dataset)
    assert run_cafs("ls", dataset.source, cache=cache).returncode == 0
    with subprocess.Popen([sys.executable, "-c", "import lmdb, sys; env = lmdb.open(sys.argv[1], max_dbs=8); "
                           "print('open', flush=True); sys.stdin.read()", str(root / "meta.lmdb")],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env()) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            r = run_cafs("cache", "clear", "--cache", cache, cache=cache)
            assert r.returncode == 1 and "nothing deleted" in r.stderr and f"pid {holder.pid}" in r.stderr, r.stderr
            assert (root / "meta.lmdb").is_dir()
        finally:
            holder.kill()  # the with closes its pipes and waits for it
    r = run_cafs("cache", "clear", "--cache", cache, cache=cache)
    assert r.returncode == 0, r.stderr
    assert not root.exists()


def _read_line(fd: int, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], "the daemon did not report"
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def test_sigterm_unmounts_and_the_daemon_exits_0(dataset: Dataset, tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    read_fd, write_fd = os.pipe()
    with open(tmp_path / "mountd.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cafs.mountd", "--ready-fd", str(write_fd), dataset.source,
             str(point), "-o", f"{full_cache(tmp_path / 'cache')},log={tmp_path / 'mount.log'}"],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            env=env())
    os.close(write_fd)
    try:
        try:
            assert _read_line(read_fd, 60) == "ok"
        finally:
            os.close(read_fd)
        assert is_mounted(point)
        assert read_file(point / "data/f0004096") == read_file(dataset.src / "data/f0004096")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "mountd.stderr").read_text()
        assert not is_mounted(point)
        assert os.listdir(point) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        unmount(point, [])


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2], ids=["USR1", "USR2"])
def test_sigusr_logs_the_counters_and_the_mount_serves_on(dataset: Dataset, tmp_path: Path,
                                                          signum: signal.Signals) -> None:
    """SIGUSR1's and SIGUSR2's default action ended the daemon: the mount was gone, files
    open on it read ENOTCONN, and its log did not say why. Each now logs the counters."""
    with mounted(dataset.source, new_mountpoint(tmp_path), full_cache(tmp_path / "cache")) as m:
        with open(m.path / "data/big", "rb") as f:
            head = f.read(MiB)
            os.kill(m.pid, signum)
            poll(lambda: "counters {" in m.log.read_text(), 30, "the counters in the mount's log")
            assert head + f.read() == read_file(dataset.src / "data/big")
        assert process_alive(m.pid) and is_mounted(m.path)
    line = next(line for line in m.log.read_text().splitlines() if "counters {" in line)
    assert json.loads(line.partition("counters ")[2])["bytes_read"] >= MiB


def test_cafs_umount(dataset: Dataset, tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(tmp_path / "cache")) as m:
        r = run_cafs("umount", point, cache=tmp_path / "cache")
        assert r.returncode == 0, r.stderr
        assert not is_mounted(point)
        wait_exit(m.pid)
    assert os.listdir(point) == []



@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at a new directory, holding one file; always unmounted."""
    point = new_mountpoint(tmp_path, "tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True, timeout=60)
    try:
        (point / "precious").write_bytes(b"only here")
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=False, timeout=60)


def test_cafs_umount_refuses_a_mount_of_another_filesystem(tmpfs: Path, tmp_path: Path) -> None:
    r = run_cafs("umount", tmpfs, cache=tmp_path / "cache")
    assert r.returncode == 1
    assert r.stderr.strip() == f"cafs: {tmpfs}: not a cafs mount (tmpfs is mounted there); nothing unmounted"
    assert os.path.ismount(tmpfs) and (tmpfs / "precious").read_bytes() == b"only here"


def test_cafs_umount_of_a_directory_that_is_not_a_mount(tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    r = run_cafs("umount", point, cache=tmp_path / "cache")
    assert r.returncode == 1
    assert r.stderr.strip() == f"cafs: {point}: not mounted"


@pytest.mark.parametrize("cover", ["its path", "a directory above"])
def test_sigterm_of_a_covered_mount_says_it_stays_mounted(dataset: Dataset, tmp_path: Path, cover: str) -> None:
    # a mount that another covers cannot be unmounted by path: the daemon still tried (a
    # 'cannot detach' warning, under a directory covered since) and logged 'unmounted',
    # while its mount stayed, dead, to answer ENOTCONN once uncovered
    above = new_mountpoint(tmp_path, "above")
    point = new_mountpoint(above)
    options = f"{full_cache(tmp_path / 'cache')},log={tmp_path / 'mount.log'}"  # not under the cover
    with mounted(dataset.source, point, options, expect_warnings=True) as m:
        with _tmpfs(point if cover == "its path" else above, "1m"):
            os.kill(m.pid, signal.SIGTERM)
            wait_exit(m.pid)
        problems = m.log_problems()
        assert len(problems) == 1 and f"{point} stays mounted, covered by another mount" in problems[0], problems
        assert f"unmounted {point}" not in m.log.read_text()


def test_sigterm_after_a_lazy_unmount_leaves_what_is_mounted_there_now(dataset: Dataset, tmp_path: Path) -> None:
    point = new_mountpoint(tmp_path)
    with mounted(dataset.source, point, full_cache(tmp_path / "cache")) as m:
        with open(point / FILE, "rb"):  # keeps the lazily unmounted mount alive
            subprocess.run(["umount", "-l", str(point)], check=True, timeout=60)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], check=True,
                           timeout=60)
            try:
                (point / "precious").write_bytes(b"only here")
                os.kill(m.pid, signal.SIGTERM)
                wait_exit(m.pid)
                assert os.path.ismount(point) and (point / "precious").read_bytes() == b"only here"
            finally:
                subprocess.run(["umount", str(point)], check=False, timeout=60)
    assert not os.path.ismount(point)

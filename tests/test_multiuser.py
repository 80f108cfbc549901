"""Several users on one host, as on a shared training cluster.

A mount usually runs as root and keeps its cache in a directory that other users must
not be able to write in: one who can could plant a symlink where cafs creates a file and
have root write through it (``cafs.cachedir``). Tests run as root; the other user is
``nobody``, made the owner of files and directories with chown.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountfix import env, import_tree, is_mounted, make_repo, mountd_pids, mounted, poll, unmount
from nobody import NOBODY, SETPRIV, nobody_python

from cafs import cachedir
from cafs.cachedir import UnsafeCacheDir
from cafs.mountd import SYSLOG_SOCKET, _listening
from cafs.repository import Repository

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to act for another user with chown")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    base = tmp_path_factory.mktemp("multiuser")
    src = base / "src"
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(100_000))
    return import_tree(src, make_repo(base / "repo", base / "icache"), "ds", base / "icache")


def _mount(source: str, mnt: Path, options: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cafs.mount_helper", source, os.fspath(mnt), "-o", options],
                          check=False, capture_output=True, text=True, timeout=120, env=env(), **kw)  # type: ignore[call-overload]


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mountpoint, unmounted at the end if a test left something mounted there."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        if is_mounted(path):
            unmount(path, mountd_pids(path))


def _victims(tmp_path: Path, names: list[str]) -> dict[str, Path]:
    victims = {}
    for name in names:
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_bytes(b"a file of root's\n")
    return victims


def test_a_mount_refuses_a_cache_directory_another_user_owns(source: str, mnt: Path, tmp_path: Path) -> None:
    """Its owner planted symlinks where the mount creates its log and its stderr file:
    root must write through neither."""
    cache = tmp_path / "cache"
    cache.mkdir()
    victims = _victims(tmp_path, ["mount.log", "mountd.stderr"])
    for name, victim in victims.items():
        (cache / name).symlink_to(victim)
        os.lchown(cache / name, NOBODY, NOBODY)
    os.chown(cache, NOBODY, NOBODY)
    r = _mount(source, mnt, f"cache={cache}")
    assert r.returncode == 32, r.stderr
    assert f"cache directory {cache} belongs to uid {NOBODY}" in r.stderr
    assert not is_mounted(mnt)
    for victim in victims.values():
        assert victim.read_bytes() == b"a file of root's\n"


def test_a_command_refuses_a_repository_cache_another_user_planted(source: str, tmp_path: Path,
                                                                    cafs, cache_dir: Path) -> None:
    """The cache directory is root's, but an older cafs made it world-writable (umask
    000) and another user made the repository's directory there, with ``in-use`` and
    LMDB's ``lock.mdb`` pointing at root's files."""
    planted = cache_dir / Repository.at(source.split("#")[0]).config.repo_id
    (planted / "meta.lmdb").mkdir(parents=True)
    victims = _victims(tmp_path, ["in-use", "lock.mdb"])
    (planted / "in-use").symlink_to(victims["in-use"])
    (planted / "meta.lmdb" / "lock.mdb").symlink_to(victims["lock.mdb"])
    for path in (planted, planted / "meta.lmdb"):
        os.chown(path, NOBODY, NOBODY)
    r = cafs("ls", source)
    assert r.code != 0
    assert f"belongs to uid {NOBODY}" in r.err
    for victim in victims.values():
        assert victim.read_bytes() == b"a file of root's\n"


def test_a_cache_made_under_umask_000_is_private(source: str, mnt: Path, tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    r = _mount(source, mnt, f"cache={cache},cache_mode=full", umask=0)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "data.bin").read_bytes()
        poll(lambda: any(True for _ in cache.glob("*/data/*/*")), 30, "a pack's cache file")
    finally:
        unmount(mnt, mountd_pids(mnt))
    made = [tmp_path / "new", *cache.rglob("*"), cache]
    assert {p.name for p in made} >= {"mount.log", "mountd.stderr", "in-use", "lock.mdb", "data.mdb", "data"}
    wrong = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in made
             if stat.S_IMODE(p.stat().st_mode) != (0o700 if p.is_dir() else 0o600)}
    assert not wrong


@pytest.mark.parametrize("mode, ok", [(0o1777, True), (0o777, False), (0o775, False), (0o755, True)])
def test_a_directory_above_the_cache_may_be_writable_by_others_only_if_sticky(tmp_path: Path, mode: int,
                                                                                ok: bool) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    if ok:
        assert cachedir.private(shared / "cache") == shared / "cache"
    else:
        with pytest.raises(UnsafeCacheDir, match=f"{shared} is writable by other users"):
            cachedir.private(shared / "cache")


def test_a_repository_cache_must_not_be_writable_by_others_even_if_sticky(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o1777)  # as a fresh tmpfs: fine for the cache directory itself
    assert cachedir.shared(cache) == cache
    with pytest.raises(UnsafeCacheDir, match="writable by other users"):
        cachedir.private(cache)


def test_a_mount_never_logs_through_a_symlink_planted_in_a_sticky_cache_directory(
        source: str, mnt: Path, tmp_path: Path) -> None:
    """A cache directory at the root of a fresh tmpfs is mode 1777: anyone may create
    names in it, such as the mount's log and the daemon's stderr file."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o1777)
    logs_to_syslog = _listening(SYSLOG_SOCKET)  # else to mount.log in the cache directory
    for name in ("mountd.stderr", *(() if logs_to_syslog else ("mount.log",))):
        for made in cache.iterdir():
            made.unlink()
        victims = _victims(tmp_path, [name])
        (cache / name).symlink_to(victims[name])
        os.lchown(cache / name, NOBODY, NOBODY)
        r = _mount(source, mnt, f"cache={cache}")
        assert r.returncode == 32, r.stderr
        assert f"{cache / name}" in r.stderr
        assert not is_mounted(mnt)
        assert victims[name].read_bytes() == b"a file of root's\n"


def test_a_cache_directory_reached_through_a_symlink_is_held_to_the_rule(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chown(elsewhere, NOBODY, NOBODY)
    (tmp_path / "link").symlink_to(elsewhere)
    with pytest.raises(UnsafeCacheDir, match=f"belongs to uid {NOBODY}"):
        cachedir.private(tmp_path / "link")


def test_a_mount_that_fusermount3_refuses_says_why(tmp_path: Path) -> None:
    """A user other than root mounts through fusermount3, which refuses a mountpoint
    that is not theirs (or a /dev/fuse they may not open): its reason, written to the
    daemon's stderr, is what the user can act on; pyfuse3 only says that
    fuse_session_mount failed."""
    found = nobody_python()
    if found is None:
        pytest.skip("needs root, setpriv and a Python that user nobody can run")
    python, pythonpath = found
    base = Path(tempfile.mkdtemp(prefix="cafs-nobody-"))  # pytest's temporary directories are root's alone
    try:
        base.chmod(0o755)
        (base / "src").mkdir()
        (base / "src" / "f").write_bytes(b"x")
        source = import_tree(base / "src", make_repo(base / "repo", tmp_path / "icache"), "ds", tmp_path / "icache")
        (base / "mnt").mkdir()  # root's
        (base / "cache").mkdir()
        os.chown(base / "cache", NOBODY, NOBODY)
        r = subprocess.run([*SETPRIV, python, "-m", "cafs.mount_helper", source, os.fspath(base / "mnt"),
                            "-o", f"cache={base / 'cache'}"], capture_output=True, text=True, timeout=120,
                           env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent"})
        assert r.returncode == 32, r.stderr
        assert "fusermount3: " in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    finally:
        if is_mounted(base / "mnt"):
            unmount(base / "mnt", mountd_pids(base / "mnt"))
        shutil.rmtree(base)


def test_another_users_umount_of_a_mount_says_whose_it_is(tmp_path: Path) -> None:
    """fusermount3 refuses it as 'entry for ... not found in /etc/mtab'."""
    found = nobody_python()
    if found is None:
        pytest.skip("needs root, setpriv and a Python that user nobody can run")
    python, pythonpath = found
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"x")
    source = import_tree(tmp_path / "src", make_repo(tmp_path / "repo", tmp_path / "icache"), "ds",
                         tmp_path / "icache")
    point = tmp_path / "mnt"
    point.mkdir()
    with mounted(source, point, f"cache={tmp_path / 'cache'}"):
        r = subprocess.run([*SETPRIV, python, "-m", "cafs.cli", "umount", os.fspath(point)], capture_output=True,
                           text=True, timeout=120,
                           env={"PYTHONPATH": pythonpath, "PATH": os.environ.get("PATH", ""), "HOME": "/nonexistent"})
        assert r.returncode == 1, r.stderr
        assert f"cannot unmount {point}: it was mounted by uid 0; only that user or root can unmount it" in r.stderr
        assert is_mounted(point)

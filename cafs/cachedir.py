"""The host's cache directory is private to the user who runs cafs.

Whoever can create names in the cache directory, or in a directory above it, can plant
a symlink where cafs is about to create a file (``in-use``, LMDB's ``lock.mdb``, a pack's
cache file, ``mount.log``, ``mountd.stderr``), and a mount, often run as root, then writes
through it into any file of the host. So:

- directories cafs makes for a cache are mode 0700 and its files 0600, whatever the
  umask (under ``umask 000`` they were world-writable);
- ``private(path)`` makes a directory of the cache (and its missing parents) that way,
  and refuses with ``UnsafeCacheDir`` one that another user could write in: it must
  belong to this user and be writable by nobody else; every directory above it must
  belong to this user or root and be writable by nobody else unless it is sticky
  (``/tmp``: others cannot rename or remove what is ours there). Symlinks along the path
  are followed, and the directories along their targets are held to the same rule.
  Each repository's cache (``<cache dir>/<repo id>``) and every directory in it is
  ``private``;
- the cache directory itself is held to the rule of the directories above, so a fresh
  tmpfs (root's, mode 1777) will do: ``shared(path)``. What cafs keeps directly in it,
  ``mount.log`` and ``mountd.stderr``, is opened by ``open_own``: never through a
  symlink, and refused unless it belongs to this user;
- cafs opens the other files it makes in the cache with ``O_NOFOLLOW`` as well
  (``CREATE_FLAGS``);
- a cafs older than this rule made a cache's directories with the umask's mode (0775
  under ``umask 002``, common on shared clusters): ``check_tree`` names every such
  directory of a repository's cache at once, with the one command that fixes them all,
  when the cache is opened, rather than one per run, and rather than leaving the
  directories under ``data/`` to refuse each chunk written there (a mount then logs it,
  a prefetch cached nothing and said nothing).

A directory on a filesystem that cannot hold symlinks (FAT, exFAT: a USB disk, whose
directories all show mode 0777 and take no chmod) passes the mode rule: nothing can be
planted there for cafs to write through. It deliberately does not look at ACLs, nor at the files already in a directory that
passes (only its owner, or root, could have put them there).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from cafs.errors import CafsError

DIR_MODE = 0o700
FILE_MODE = 0o600
CREATE_FLAGS = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # with O_RDONLY, O_RDWR, ...


class UnsafeCacheDir(CafsError):
    """A cache directory (or one above it, or a file in it) that another user could write."""


def private(path: Path) -> Path:
    """``path`` as an absolute path, made (mode 0700, parents too) if missing and
    checked (see the module docstring). Raises ``UnsafeCacheDir``, or OSError for a
    directory that cannot be made."""
    path = Path(os.path.abspath(path))
    make_dirs(path)
    check(path, sticky=False)
    return path


def shared(path: Path) -> Path:
    """``private(path)``, but ``path`` may also be root's and sticky, as ``/tmp`` is."""
    path = Path(os.path.abspath(path))
    make_dirs(path)
    check(path, sticky=True)
    return path


def open_own(path: Path, flags: int) -> int:
    """``os.open`` of a file of the cache directory, made 0600 if missing; never through a
    symlink (ELOOP), and ``UnsafeCacheDir`` if the file belongs to another user."""
    fd = os.open(path, flags | CREATE_FLAGS, FILE_MODE)
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise UnsafeCacheDir(f"{path} belongs to uid {owner}, not to this user (uid {os.geteuid()}); "
                             "remove it, or use a cache directory of your own")
    return fd


def check_tree(root: Path) -> None:
    """Raise ``UnsafeCacheDir`` naming the directories of the repository cache at ``root``
    (itself, ``meta.lmdb``, ``data``, ``data/XX``) that others could write in; missing
    ones are no matter."""
    data = root / "data"
    try:
        subdirs = sorted(data.iterdir())
    except OSError:
        subdirs = []
    loose = []
    for d in (root, root / "meta.lmdb", data, *subdirs):
        try:
            st = os.lstat(d)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and _others_write(d, st):
            loose.append((d, stat.S_IMODE(st.st_mode)))
    if loose:
        first, mode = loose[0]
        others = f" and {len(loose) - 1} other director{'y' if len(loose) == 2 else 'ies'} of it" if len(loose) > 1 else ""
        raise UnsafeCacheDir(f"cache directory {first} (mode {mode:04o}){others} writable by other users (an older "
                             f"cafs made its directories so under umask 002): they could make cafs write into any "
                             f"file; chmod -R go-w {root}")


def make_dirs(path: Path) -> None:
    """``mkdir -p -m 0700 path``: ``Path.mkdir`` makes missing parents with the umask's
    mode, world-writable under ``umask 000``."""
    missing = []
    for p in (path, *path.parents):
        if os.path.isdir(p):
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            os.mkdir(p, DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(p):
                raise


def check(path: Path, *, sticky: bool = False) -> None:
    """Raise ``UnsafeCacheDir`` unless the existing directory ``path`` is private (with
    ``sticky``, may be as the directories above it may be)."""
    path = Path(os.path.abspath(path))
    real = Path(os.path.realpath(path))
    euid = os.geteuid()
    _check_one(path, path, euid, strict=not sticky)
    # the parents as written hold the symlinks on the way (stat follows them), those of
    # the real path the directories they lead to; nearest first, for the message
    for parent in dict.fromkeys([*path.parents, *real.parents]):
        _check_one(path, parent, euid, strict=False)


def _check_one(cache: Path, d: Path, euid: int, *, strict: bool) -> None:
    st = os.stat(d)
    what = f"cache directory {cache}" + ("" if d == cache else f": {d}")
    if st.st_uid != euid and (strict or st.st_uid != 0):
        raise UnsafeCacheDir(f"{what} belongs to uid {st.st_uid}, not to this user (uid {euid}): "
                             "its owner could make cafs write into any file; use a directory of your own")
    if (strict or not st.st_mode & stat.S_ISVTX) and _others_write(d, st):
        raise UnsafeCacheDir(f"{what} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}): "
                             f"they could make cafs write into any file; chmod go-w {d}")


def _others_write(d: Path, st: os.stat_result) -> bool:
    """Whether users other than its owner can create names in directory ``d`` (``st``):
    its mode lets them, and its filesystem can hold the symlinks they would plant."""
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not _without_symlinks(d)


def _without_symlinks(d: Path) -> bool:
    """Whether the filesystem of directory ``d`` refuses to make symlinks (tried once,
    in ``d``; False if ``d`` cannot be written or takes one)."""
    probe = d / f".cafs-symlink-probe-{os.getpid()}"
    try:
        os.symlink("probe", probe)
    except OSError as exc:
        return exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)
    os.unlink(probe)
    return False

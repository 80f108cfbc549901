"""A store in a local directory (``file://`` URLs and plain paths).

Objects are files under the root at their key's path. A put writes a temporary file in
the target directory, fsyncs it and renames it into place (exclusive puts hard-link it
into place instead, which fails if the name exists; on a filesystem without hard links,
FAT or exFAT, they rename it with ``RENAME_NOREPLACE``, and where that is refused too, a
FUSE driver of those, they rename it after checking that the name is free, which two
writers at once could both pass), so a reader never sees a partial
object and a crash leaves at most a stray ``.tmp-*`` file, which ``list`` skips and
``remove_temporaries`` (``Temporaries``, for gc) removes once it is stale. A listing
fails on any directory it cannot read (one skipped would hide the objects it holds).
``open_writer`` (``StreamingWrites``) does the same for an object written in pieces
(a pack, segment by segment while it fills); ``put`` is one such writer, of one piece.

Objects of ``DROP_CACHE_MIN`` bytes or more (packs) stay out of the page cache, as borg
keeps its segments out: nobody reads a pack back soon after writing it, so its pages would
only evict the user's hot data. A page-aligned piece (the pack writer's segments, which
are anonymous maps) goes out with O_DIRECT, block-aligned head first and the tail the
ordinary way; other buffers, or filesystems that refuse O_DIRECT, write through the
cache and drop the pages once fsynced. Fresh page-cache pages are the dear part of a
write on a virtual machine that hands freed memory back to its host: 380 MB/s against
1.5 GB/s for O_DIRECT here.
For the same reasons a ranged read (a mount reading the repository in place) drops the
pages it read: the kernel keeps those bytes in the page cache of the mounted file.

A mount reading in place uses ``ResidentReads``: ``advise`` when a file is opened, so the
disk is already at work when its first read arrives, and ``get_resident``
(``RWF_NOWAIT``) to serve that read on the mount's event loop when the pages are there.
Both run on that loop for every small file, so they keep the last ``OPEN_PACKS`` objects
they met open (an LRU, behind a lock, closed when the store is collected): an open and a
close per call cost a tenth of a cold small file's daemon CPU. Objects are immutable,
so a descriptor stays right for as long as it is open, even after a ``delete``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

from cafs.errors import NoSpaceError, ObjectNotFound, StoreError
from cafs.fileio import DIRECT_ALIGN, open_files_share, read_resident
from cafs.stores.base import ObjectExists, check_key

TMP_PREFIX = ".tmp-"
DROP_CACHE_MIN = 1 << 20
OPEN_PACKS = 64
OPEN_FILES_FRACTION = 16  # ... and at most this share of the open-files limit


class _ReadDescriptors:
    """The last ``limit`` objects read, open read-only; use under ``lock``."""

    def __init__(self, limit: int) -> None:
        self.lock = threading.Lock()
        self._limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def get(self, key: str, path: Callable[[str], Path]) -> int:
        """The descriptor of object ``key``, opened at ``path(key)`` if needed (raises
        OSError or StoreError)."""
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = self._fds[key] = os.open(path(key), os.O_RDONLY | os.O_CLOEXEC)
        if len(self._fds) > self._limit:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        with self.lock:
            while self._fds:
                os.close(self._fds.popitem()[1])


class LocalStore:
    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.url = f"file://{root}"
        self.fsync = fsync
        self._readers = _ReadDescriptors(min(OPEN_PACKS, open_files_share(OPEN_FILES_FRACTION)))
        weakref.finalize(self, self._readers.close)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if length is None:
                    f.seek(offset)
                    return f.read()
                data = os.pread(f.fileno(), length, offset)
                os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.url}: no object {key}") from None
        except OSError as exc:
            raise StoreError(f"{self.url}: reading {key}: {exc.strerror or exc}") from None
        if len(data) != length:
            raise StoreError(
                f"{self.url}: object {key} is shorter than expected "
                f"(wanted {length} bytes at {offset}, got {len(data)}): truncated?")
        return data

    def advise(self, key: str, offset: int, length: int) -> None:
        with self._readers.lock:
            try:
                fd = self._readers.get(key, self._path)
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
            except (OSError, StoreError):
                pass

    def get_resident(self, key: str, offset: int, length: int) -> bytearray | None:
        with self._readers.lock:
            try:
                fd = self._readers.get(key, self._path)
                buf = read_resident(fd, offset, length)
                if buf is not None:
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            except (OSError, StoreError):
                return None
        return buf

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        writer = self.open_writer(key)
        try:
            writer.write(data)
            writer.commit(exclusive=exclusive)
        except BaseException:
            writer.abort()
            raise

    def open_writer(self, key: str) -> _LocalWriter:
        return _LocalWriter(self, key, self._path(key))

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.root / prefix if prefix else self.root
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"list prefix {prefix!r} must end with '/'")
        try:
            for dirpath, _dirnames, filenames in os.walk(base, onerror=_unless_vanished):
                rel = os.path.relpath(dirpath, self.root)
                for name in filenames:
                    if name.startswith(TMP_PREFIX):
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    try:
                        size = os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue
                    yield key, size
        except OSError as exc:
            raise StoreError(f"{self.url}: listing {prefix}: {exc.strerror or exc}") from None

    def remove_temporaries(self, prefix: str, older_than: float) -> tuple[int, int]:
        base = self.root / prefix if prefix else self.root
        cutoff = time.time() - older_than
        files = size = 0
        try:
            for dirpath, _dirnames, filenames in os.walk(base, onerror=_unless_vanished):
                for name in filenames:
                    if not name.startswith(TMP_PREFIX):
                        continue
                    path = os.path.join(dirpath, name)
                    try:
                        st = os.stat(path)
                        if st.st_mtime < cutoff:
                            os.unlink(path)
                            files, size = files + 1, size + st.st_size
                    except FileNotFoundError:
                        continue  # its writer committed or gave it up meanwhile
        except OSError as exc:
            raise StoreError(f"{self.url}: removing temporary files under {prefix}: {exc.strerror or exc}") from None
        return files, size

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.url}: deleting {key}: {exc.strerror or exc}") from None


class _LocalWriter:
    """An object written into a temporary file beside its final name, renamed into place
    by ``commit``. Pieces of ``DROP_CACHE_MIN`` bytes or more go around the page cache
    (``_write_direct``); a whole object of that size is dropped from it once fsynced."""

    def __init__(self, store: LocalStore, key: str, path: Path) -> None:
        self._store = store
        self._key = key
        self._path = path
        self._tmp = path.parent / f"{TMP_PREFIX}{os.urandom(8).hex()}"
        self._written = 0
        self._fd: int | None = None
        with self._errors():
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(f"{self._store.url}: no space left on device writing {self._key}") from None
            raise StoreError(f"{self._store.url}: writing {self._key}: {exc.strerror or exc}") from None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after commit or abort"
        with self._errors():
            view = memoryview(data)
            self._written += len(view)
            if len(view) >= DROP_CACHE_MIN:
                view = _write_direct(self._fd, view)
            while view:
                view = view[os.write(self._fd, view):]

    def commit(self, *, exclusive: bool = False) -> None:
        fd, self._fd = self._fd, None
        assert fd is not None, "commit after commit or abort"
        fsync = self._store.fsync
        with self._errors():
            try:
                if fsync:
                    os.fsync(fd)
                    if self._written >= DROP_CACHE_MIN:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            if exclusive:
                try:
                    _place_new(self._tmp, self._path)
                except FileExistsError:
                    raise ObjectExists(f"{self._store.url}: {self._key} exists already") from None
                finally:
                    self._tmp.unlink(missing_ok=True)
            else:
                os.replace(self._tmp, self._path)
            if fsync:
                _fsync_dir(self._path.parent)

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                os.close(fd)
            self._tmp.unlink(missing_ok=True)
        except OSError:
            pass


# what link() gives on a filesystem that has no hard links (FAT, exFAT)
_NO_LINKS = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _place_new(tmp: Path, path: Path) -> None:
    """Give the file ``tmp`` the name ``path``, which must not exist yet (FileExistsError
    if it does); ``tmp`` may keep its name too."""
    try:
        os.link(tmp, path)
        return
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    if _rename_noreplace(tmp, path):
        return
    if os.path.lexists(path):  # not atomic: the best a filesystem without either allows
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    os.rename(tmp, path)


def _rename_noreplace(tmp: Path, path: Path) -> bool:
    """``renameat2(RENAME_NOREPLACE)``; False if the filesystem (or libc) has no such
    rename, FileExistsError if ``path`` exists."""
    import ctypes  # here: needed only where hard links are missing

    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(path))


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2``, None if it has none (older than glibc 2.28); looked up once,
    as finding libc runs ldconfig."""
    import ctypes.util

    try:
        renameat2 = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).renameat2
    except AttributeError:
        return None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2


def _write_direct(fd: int, view: memoryview) -> memoryview:
    """Write the block-aligned head of ``view`` with O_DIRECT when the buffer allows it;
    return what is left to write the ordinary way."""
    import ctypes  # here: 3 ms of every command's start-up, needed only to write a pack

    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only (bytes): no address to check
        return view
    if address % DIRECT_ALIGN:
        return view
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return view
    try:
        while len(view) >= DIRECT_ALIGN:
            n = os.write(fd, view[:len(view) - len(view) % DIRECT_ALIGN])
            view = view[n:]
            if n % DIRECT_ALIGN:
                break
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return view


def _unless_vanished(exc: OSError) -> None:
    """``os.walk``'s error handler for a listing: a directory that does not exist (yet, or
    any more) lists nothing, any other error fails it. A directory skipped quietly would
    hide its objects, and gc would delete what they reference."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

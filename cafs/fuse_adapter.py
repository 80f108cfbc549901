"""The pyfuse3 adapter: kernel requests in, ``SnapshotFS`` calls, errno out. Nothing else.

Every handler is wrapped by ``_errors``, the one place where cafs exceptions become
errno: a missing path ENOENT, a non-directory ENOTDIR, a directory opened as a file
EISDIR, a name longer than ``f_namemax`` ENAMETOOLONG, anything that failed to verify or
fetch EIO (logged; but not each request that a mount being unmounted ends with
``FetcherClosed``: the daemon says once that it is unmounting). Every call that would change the filesystem gets EROFS, and so does
an open for writing or with ``O_TRUNC`` (``O_RDONLY | O_APPEND`` is a read-only open and
succeeds). Content never changes, so entries and attributes carry long timeouts and files
are opened with ``keep_cache``: a second read is served by the kernel's page cache
without reaching this process.

Threading: all handlers run on the trio thread of ``pyfuse3.main``; the model they call
hands blocking work to worker threads (see ``cafs.fetch``). A node the model needs from
the store raises ``NodeNotLoaded``: ``_errors`` has it loaded (``SnapshotFS.load_node``:
in a worker thread, one load for all the requests that need that node) and runs the
handler again (handlers are idempotent; ``readdir`` resumes where it stopped), so a slow
store delays only the requests that need it, each for the store deadline at most
(``Fetcher.store_call``).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from typing import Any, TypeVar
from collections.abc import Awaitable, Callable

import pyfuse3

from cafs.errors import CafsError, FetcherClosed, PathNotFound
from cafs.metacache import NodeNotLoaded
from cafs.fsmodel import (BLOCK_SIZE, NAME_MAX, Attributes, IsADirectory, NameTooLong, NotADirectory,
                          SnapshotFS)

log = logging.getLogger("cafs.fuse")

TIMEOUT = 24 * 3600.0
T = TypeVar("T")


def errno_of(exc: BaseException) -> int:
    if isinstance(exc, NotADirectory):
        return errno.ENOTDIR
    if isinstance(exc, IsADirectory):
        return errno.EISDIR
    if isinstance(exc, NameTooLong):
        return errno.ENAMETOOLONG
    if isinstance(exc, PathNotFound):
        return errno.ENOENT
    return errno.EIO


MAX_NODE_LOADS = 4096  # per request: deeper than any path, more than any listing's pages


def _errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any) -> T:
        try:
            for _ in range(MAX_NODE_LOADS):
                try:
                    return await fn(*args)
                except NodeNotLoaded as missing:
                    await args[0].fs.load_node(missing.loc)
            raise CafsError(f"{fn.__name__}: too many nodes to load for one request")
        except pyfuse3.FUSEError:
            raise
        except PathNotFound as exc:
            raise pyfuse3.FUSEError(errno_of(exc)) from None
        except FetcherClosed as exc:  # asked for: a SIGTERM ended a hundred reads, a hundred ERROR lines
            log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except CafsError as exc:
            log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _read_only(*_args: Any) -> None:
    raise pyfuse3.FUSEError(errno.EROFS)


def entry_attributes(a: Attributes) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    out.st_ino = a.ino
    out.generation = 0
    out.entry_timeout = TIMEOUT
    out.attr_timeout = TIMEOUT
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = 0
    out.st_size = a.size
    out.st_blksize = BLOCK_SIZE
    out.st_blocks = a.blocks
    out.st_atime_ns = a.mtime_ns
    out.st_mtime_ns = a.mtime_ns
    out.st_ctime_ns = a.mtime_ns
    return out


class CafsOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, fs: SnapshotFS) -> None:
        super().__init__()
        self.fs = fs

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino, e = self.fs.lookup(parent_inode, name)
        return entry_attributes(self.fs.attributes(ino, e))

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return entry_attributes(self.fs.attributes(inode))

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not self.fs.entry(inode).is_dir:
            raise NotADirectory(f"inode {inode}")
        return inode

    @_errors
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        start = start_id
        while True:
            try:
                for ino, e, next_id in self.fs.listdir(fh, start):
                    if not pyfuse3.readdir_reply(token, e.name, entry_attributes(self.fs.attributes(ino, e)), next_id):
                        return
                    start = next_id
                return
            except NodeNotLoaded as missing:  # resume after the entries already replied
                await self.fs.load_node(missing.loc)

    async def releasedir(self, fh: int) -> None:
        return None

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        # O_APPEND alone asks for no write access: a read-only open like any other
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=self.fs.open(inode), keep_cache=True)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self.fs.entry(inode)
        return not mode & os.W_OK

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total_bytes, total_entries = self.fs.statfs_totals()
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLOCK_SIZE
        s.f_frsize = 4096
        s.f_blocks = (total_bytes + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = total_entries
        s.f_ffree = s.f_favail = 0
        s.f_namemax = NAME_MAX
        return s

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        value = self.fs.xattrs(inode).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return list(self.fs.xattrs(inode))

    async def forget(self, inode_list: Any) -> None:
        return None  # inode numbers are derived, nothing is held per lookup

    async def setattr(self, *args: Any) -> None:
        _read_only()

    mknod = mkdir = unlink = rmdir = symlink = rename = link = setattr
    create = write = setxattr = removexattr = setattr

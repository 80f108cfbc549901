"""Extracting a file or tree from a snapshot to a local directory (``cafs get``).

Contract:

- Byte-exact: every chunk is read through ``Repository.read_object``, which verifies it
  against its id; modes and mtimes are restored (owners too when running as root);
  symlinks are created with their targets verbatim, never followed.
- Never writes through a name to anything else: a file already in DEST is written in
  place only if it has no other name; one with several (a hard link, perhaps to a file
  outside DEST, or to another file of an earlier extraction) is kept only if it is
  exactly the entry already (bytes, mode, mtime), and replaced otherwise.
- Never writes outside DEST: everything below DEST is reached through directory file
  descriptors opened with ``O_NOFOLLOW``, names come from validated nodes (no ``/``,
  ``.``, ``..`` or NUL), and anything in the way of an entry (a symlink where a directory
  belongs, a directory where a file belongs) is removed, not followed. DEST itself is
  never followed either: a symlink to a directory there is refused (whatever is
  extracted), unless it is the very symlink being extracted.
- Never writes into the repository it reads (on a local disk): a DEST that is the
  repository or inside it is refused, and neither the repository's directory nor one
  holding it is entered or removed on the way (a snapshot's ``config`` or ``packs``
  would replace the repository's own). Nor is a directory in the way removed when a
  filesystem is mounted on it or below it: its files are not DEST's.
- Resumable like rsync: an existing file is kept where its bytes already match; each span
  is compared by hash and only missing or wrong spans are fetched and written. A re-run
  after an interruption fills only what is missing or wrong. Entries present in DEST but
  not in the snapshot are left alone. A file that cannot be opened for writing (a
  program running from DEST, ETXTBSY; another user's file, in a directory a group
  shares) is kept if it is the entry already, else replaced by a new file. Modes, owners
  and mtimes are set only where they differ, and a directory is made writable for the
  run only if ours: a re-run by another user over an extraction with nothing to change
  changes nothing and succeeds. A directory of ours in the way is removed whole even
  where an earlier run gave it, or directories below it, a mode without write or search
  for the owner (a read-only dataset's 0o555).
- Holes: zeros not yet on disk are not written, whole chunks of them or the pieces
  between 4 KiB boundaries of the file within a chunk, so sparse files stay sparse.
- Hard links: entries that were one file with several names when imported (the same
  inode number and link count, and equal content and attributes) become one file with
  several names again, as the first of them extracted. Such files are held open to link
  their other names to, up to a quarter of the open-files limit at once (5,000 under a
  limit of 20,000); beyond that a name gets its own copy.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cafs.dirfds import CLOSED, close_above, open_parent
from cafs.errors import CafsError, ExtractError, NoSpaceError
from cafs.fileio import open_files_share, pwrite_all
from cafs.format.location import Location
from cafs.format.nodes import Entry
from cafs.ids import digest
from cafs.metacache import NodeReader
from cafs.mounttable import mounts
from cafs.readahead import ChunksAhead
from cafs.repository import Repository
from cafs.tree import file_spans, list_dir, show_path, walk

LINK_GROUPS_SHARE = 4  # of the open-files limit: files held open to link their other names to
HOLE_BLOCK = 4096  # zeros not yet on disk between multiples of this are left as holes
_ZERO_BLOCK = bytes(HOLE_BLOCK)


@dataclass
class ExtractCounters:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    bytes_written: int = 0
    bytes_kept: int = 0  # already correct in DEST
    links: int = 0  # names made hard links of a file extracted before


class Extractor:
    def __init__(self, repo: Repository, reader: NodeReader) -> None:
        self.repo = repo
        self.reader = reader
        self.counters = ExtractCounters()
        self.as_root = os.geteuid() == 0
        self._links: dict[tuple[object, ...], _LinkGroup] = {}
        # A dataset deduplicated with hard links (rdfind, hardlink) has thousands of
        # groups whose names lie far apart in the walk; 256 made the rest copies.
        self._link_groups_max = open_files_share(LINK_GROUPS_SHARE, least=16)
        self._ahead: ChunksAhead | None = None  # while extracting
        # a local repository's real path, and (st_dev, st_ino) of its directory and of
        # every directory above it
        self._repo_real: Path | None = None
        self._repo_dir: tuple[int, int] | None = None
        self._repo_holders: set[tuple[int, int]] = set()
        root = repo.local_root
        if root is not None and root.is_dir():
            self._repo_real = Path(os.path.realpath(root))
            holders = [_dev_ino(os.stat(d)) for d in (self._repo_real, *self._repo_real.parents)]
            self._repo_dir = holders[0]
            self._repo_holders = set(holders)

    def close(self) -> None:
        for group in self._links.values():
            os.close(group.fd)
        self._links.clear()

    def extract(self, entry: Entry, dest: Path, *, into: bool = False) -> None:
        """Extract ``entry`` to ``dest``: a directory's contents go into ``dest``; a file or
        symlink becomes ``dest`` (or ``dest/name`` when ``dest`` is an existing directory,
        or with ``into``, DEST given with a trailing slash: a directory, made if missing).
        From a remote repository, chunks are read ahead (``cafs.readahead``)."""
        self._ahead = ChunksAhead(self.repo, self._plan(entry, dest))
        try:
            self._extract(entry, dest, into=into)
        finally:
            self._ahead.close()
            self._ahead = None

    def _plan(self, top: Entry, dest: Path) -> Iterator[Location]:
        """The chunks extracting ``top`` to ``dest`` will read, as far as DEST tells: those
        of the files it lacks or has at another size, in the order they are written (a
        file whose size is right is compared chunk by chunk first, and read alone)."""
        if not top.is_dir:
            yield from file_spans(self.reader, top)
            return
        linked: set[tuple[object, ...]] = set()
        for path, entry in walk(self.reader, top):
            if not entry.is_file or entry.size == 0:
                continue
            if entry.nlink > 1:  # its other names are links to the first, not read again
                key = _link_key(entry)
                if key in linked:
                    continue
                linked.add(key)
            try:
                st = os.lstat(os.path.join(os.fsencode(dest), path))
                if stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
                    continue
            except OSError:
                pass
            yield from file_spans(self.reader, entry)

    def _extract(self, entry: Entry, dest: Path, *, into: bool) -> None:
        if self._repo_real is not None:
            real = Path(os.path.realpath(dest))
            if real == self._repo_real or self._repo_real in real.parents:
                raise ExtractError(f"{dest}: in the repository {self.repo.url}; cafs get never writes there")
        try:
            if entry.is_dir:
                if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                    raise ExtractError(f"{dest}: exists and is not a directory")
                dest.mkdir(parents=True, exist_ok=True)
                fd = self._open_dir(dest)
                try:
                    self._fill_dir(fd, entry, dest)
                    self._set_attrs(fd, entry)
                finally:
                    os.close(fd)
                return
            if dest.is_symlink() and dest.is_dir() and not self._is_symlink_of(dest, entry):
                raise ExtractError(f"{dest}: a symlink to a directory; cafs get neither writes through "
                                   "nor replaces it: give the directory itself")
            if into and not dest.is_symlink() and not dest.exists():
                dest.mkdir(parents=True)
            if dest.is_dir() and not dest.is_symlink():
                parent, name = dest, entry.name
            elif into:
                raise ExtractError(f"{dest}/: exists and is not a directory")
            else:
                parent, name = dest.parent, os.fsencode(dest.name)
                if not parent.is_dir():
                    raise ExtractError(f"{parent}: no such directory")
            fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
            path = parent / os.fsdecode(name)
            try:
                self._extract_leaf(fd, name, entry, path)
            except OSError as exc:
                raise _os_error(exc, path) from None
            finally:
                os.close(fd)
        except OSError as exc:
            raise _os_error(exc, dest) from None

    @staticmethod
    def _is_symlink_of(dest: Path, entry: Entry) -> bool:
        """Whether ``dest`` is the symlink ``entry`` already (an earlier get of it)."""
        return entry.is_symlink and os.readlink(os.fsencode(dest)) == entry.target

    def _extract_leaf(self, dir_fd: int, name: bytes, entry: Entry, path: Path) -> None:
        """A file (written, or linked to an earlier name of it) or a symlink."""
        if entry.is_file:
            group = _link_key(entry) if entry.nlink > 1 else None
            if group is None or not self._link_file(dir_fd, name, group):
                self._write_file(dir_fd, name, entry, path, group)
        else:
            self._make_symlink(dir_fd, name, entry)

    def _fill_dir(self, fd: int, d: Entry, where: Path) -> None:
        """Extract what ``d`` holds into the open directory ``fd`` (whose own attributes
        the caller sets). Iterative, with one descriptor per level of which only the
        deepest are open (``cafs.dirfds``): a tree may be deeper than Python's recursion
        limit and than the number of files a process may open."""
        self._enter_dir(fd)
        stack = [_Level(fd, _dev_ino(os.fstat(fd)), d, where, iter(list_dir(self.reader, d)))]
        try:
            while stack:
                level = stack[-1]
                child = next(level.children, None)
                if child is None:
                    stack.pop()
                    if stack:  # a subdirectory is complete: its attributes last
                        self._leave_dir(level, stack[-1])
                    continue
                path = level.path / os.fsdecode(child.name)
                try:
                    if child.is_dir:
                        stack.append(self._sub_level(level.fd, child, path))
                        close_above(stack, first=1)  # the caller's own stays open
                    else:
                        self._extract_leaf(level.fd, child.name, child, path)
                except OSError as exc:
                    raise _os_error(exc, path) from None
        finally:
            for level in stack[1:]:
                if level.fd != CLOSED:
                    os.close(level.fd)

    def _sub_level(self, dir_fd: int, d: Entry, path: Path) -> _Level:
        """Make (or keep) and open the subdirectory ``d`` of ``dir_fd``, to be filled."""
        sub = self._make_dir(dir_fd, d.name)
        try:
            dev_ino = _dev_ino(os.fstat(sub))
            if dev_ino == self._repo_dir:
                raise ExtractError(f"{path}: is the repository {self.repo.url}; cafs get never writes into it")
            self._enter_dir(sub)
            return _Level(sub, dev_ino, d, path, iter(list_dir(self.reader, d)))
        except BaseException:
            os.close(sub)
            raise

    def _leave_dir(self, level: _Level, parent: _Level) -> None:
        """Set the attributes of the filled ``level`` and close it, opening ``parent``
        again first if it was closed while the walk was deeper (before the mode is set:
        ``..`` needs search permission)."""
        try:
            if parent.fd == CLOSED:
                fd = open_parent(level.fd, parent.dev_ino)
                if fd is None:
                    raise ExtractError(f"{show_path(os.fsencode(level.path))}: moved out of its directory while "
                                       "being extracted; run cafs get again")
                parent.fd = fd
            self._set_attrs(level.fd, level.entry)
        except OSError as exc:
            raise _os_error(exc, level.path) from None
        finally:
            os.close(level.fd)

    def _enter_dir(self, fd: int) -> None:
        self.counters.dirs += 1
        if not self.as_root:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
                os.chmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)

    def _make_dir(self, dir_fd: int, name: bytes) -> int:
        st = _lstat(dir_fd, name)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=dir_fd)
        if st is None or not stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        return self._open_dir(name, dir_fd)

    def _open_dir(self, name: bytes | Path, dir_fd: int | None = None) -> int:
        """Open a directory, never through a symlink. Not as root, a directory of ours that
        an earlier run gave a mode without read or search for its owner (the snapshot's
        mode, 0o300 say) gets them back first; its mode is set again when it is done."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except PermissionError:
            if self.as_root:
                raise
        _add_owner_bits(name, dir_fd, stat.S_IRWXU, directory=True)
        return os.open(name, flags, dir_fd=dir_fd)

    def _clear_for_file(self, dir_fd: int, name: bytes, entry: Entry) -> bool:
        """Remove what is at ``name`` unless it is a regular file that may be written in
        place: one with no other name, or one with several (a hard link, perhaps to a
        file outside DEST) that is ``entry`` already, so that nothing is written to it.
        True for the latter: its bytes were just checked, all of them."""
        st = _lstat(dir_fd, name)
        if st is None or stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            return False
        if stat.S_ISREG(st.st_mode) and self._is_already(dir_fd, name, st, entry):
            return True
        self._remove(dir_fd, name, st)
        return False

    def _is_already(self, dir_fd: int, name: bytes, st: os.stat_result, entry: Entry) -> bool:
        """Whether the file at ``name`` has ``entry``'s bytes, mode and mtime (and owner,
        as root)."""
        if (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) != (entry.size, entry.mode, entry.mtime_ns):
            return False
        if self.as_root and (st.st_uid, st.st_gid) != (entry.uid, entry.gid):
            return False
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except PermissionError:
            return False
        try:
            pos = 0
            for span in file_spans(self.reader, entry):
                if digest(os.pread(fd, span.length, pos)) != span.id:
                    return False
                pos += span.length
            return True
        finally:
            os.close(fd)

    def _write_file(self, dir_fd: int, name: bytes, entry: Entry, path: Path,
                    link_key: tuple[object, ...] | None = None) -> None:
        kept = self._clear_for_file(dir_fd, name, entry)
        try:
            fd = self._open_for_writing(dir_fd, name)
        except OSError as exc:
            if exc.errno not in (errno.ETXTBSY, errno.EPERM, errno.EACCES):
                raise
            fd, kept = self._open_unwritable(dir_fd, name, entry)
        try:
            if kept:
                self.counters.bytes_kept += entry.size
            else:
                self._fill(fd, entry)
            self._set_attrs(fd, entry)
            if link_key is not None and len(self._links) < self._link_groups_max:
                st = os.fstat(fd)
                self._links[link_key] = _LinkGroup(os.open(f"/proc/self/fd/{fd}", os.O_PATH),
                                                   (st.st_dev, st.st_ino), entry.nlink - 1)
        finally:
            os.close(fd)
        self.counters.files += 1

    def _fill(self, fd: int, entry: Entry) -> None:
        """Make the open file hold ``entry``'s bytes: spans already there are kept, the
        rest fetched and written (runs of zeros not on disk yet are left as holes)."""
        on_disk = os.fstat(fd).st_size
        pos = 0
        # A sparse file's holes are one chunk of zeros over and over (a 20 GiB hole took
        # 8 s to read, decompress and hash again for each): the chunk met last is kept,
        # so a repeat is compared, not hashed, and read from the store once; a repeat of
        # zeros over a hole already on disk (a re-run) is not even read back.
        last: _Chunk | None = None
        for span in file_spans(self.reader, entry):
            repeat = last if last is not None and last.id == span.id else None
            if (repeat is not None and repeat.zeros and pos + span.length <= on_disk
                    and _no_data_in(fd, pos, span.length)):
                self.counters.bytes_kept += span.length
                pos += span.length
                continue
            existing = os.pread(fd, span.length, pos) if pos < on_disk else b""
            if repeat is not None:
                kept = existing == repeat.data
            else:
                kept = len(existing) == span.length and digest(existing) == span.id
                if kept:
                    last = _Chunk(span.id, existing)
            if kept:
                self.counters.bytes_kept += span.length
            else:
                chunk = repeat if repeat is not None else _Chunk(span.id, self._read_chunk(span))
                last = chunk
                if existing:
                    pwrite_all(fd, chunk.data, pos)
                elif not chunk.zeros:
                    _write_leaving_holes(fd, chunk.data, pos)
                self.counters.bytes_written += span.length
            pos += span.length
        os.ftruncate(fd, entry.size)

    def _read_chunk(self, span: Location) -> bytes:
        assert self._ahead is not None, "chunks are read within extract()"
        return self._ahead.read(span)

    def _link_file(self, dir_fd: int, name: bytes, key: tuple[object, ...]) -> bool:
        """Make ``name`` a hard link of the file extracted first for ``key``; False if
        there is none (yet)."""
        group = self._links.get(key)
        if group is None:
            return False
        st = _lstat(dir_fd, name)
        if st is None or (st.st_dev, st.st_ino) != group.dev_ino:
            if st is not None:
                self._remove(dir_fd, name, st)
            os.link(f"/proc/self/fd/{group.fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        group.left -= 1
        if group.left <= 0:  # every name of it is made: nothing more will link to it
            os.close(group.fd)
            del self._links[key]
        self.counters.files += 1
        self.counters.links += 1
        return True

    def _open_for_writing(self, dir_fd: int, name: bytes) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        try:
            return os.open(name, flags, 0o600, dir_fd=dir_fd)
        except PermissionError:
            if self.as_root:
                raise
        # not root, and a file an earlier run gave a mode without read or write for its
        # owner (0o444, 0o200, 0) is in the way: give them back to check and repair it;
        # its mode is set again when it is done
        _add_owner_bits(name, dir_fd, stat.S_IRUSR | stat.S_IWUSR, directory=False)
        return os.open(name, flags, 0o600, dir_fd=dir_fd)

    def _open_unwritable(self, dir_fd: int, name: bytes, entry: Entry) -> tuple[int, bool]:
        """The file at ``name`` cannot be opened for writing (a program running from it,
        ETXTBSY; another user's): kept if it is ``entry`` already, opened read-only;
        else replaced by a new file (a program running keeps the old one; removing
        another user's needs a directory we may write). The descriptor, and whether it
        was kept."""
        st = _lstat(dir_fd, name)
        if st is not None and stat.S_ISREG(st.st_mode) and self._is_already(dir_fd, name, st, entry):
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd), True
        os.unlink(name, dir_fd=dir_fd)
        return self._open_for_writing(dir_fd, name), False

    def _make_symlink(self, dir_fd: int, name: bytes, entry: Entry) -> None:
        assert entry.target is not None
        st = _lstat(dir_fd, name)
        if st is not None:
            if not (stat.S_ISLNK(st.st_mode) and os.fsencode(os.readlink(name, dir_fd=dir_fd)) == entry.target):
                self._remove(dir_fd, name, st)
                st = None
        if st is None:
            os.symlink(entry.target, name, dir_fd=dir_fd)
        if self.as_root and (st is None or (st.st_uid, st.st_gid) != (entry.uid, entry.gid)):
            os.chown(name, entry.uid, entry.gid, dir_fd=dir_fd, follow_symlinks=False)
        if st is None or st.st_mtime_ns != entry.mtime_ns:
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        self.counters.symlinks += 1

    def _remove(self, dir_fd: int, name: bytes, st: os.stat_result) -> None:
        """Remove what ``st`` says is at ``name``: a directory with all it holds, unless
        it is the repository or holds it, or a filesystem is mounted on it or below it
        (whose files are not DEST's to remove)."""
        if stat.S_ISDIR(st.st_mode):
            if _dev_ino(st) in self._repo_holders:
                raise ExtractError(f"{os.fsdecode(name)!r} is in the way and holds the repository "
                                   f"{self.repo.url}; cafs get never removes it")
            where = os.path.join(os.readlink(b"/proc/self/fd/%d" % dir_fd), name)
            mounted = [m.mountpoint for m in mounts()
                       if os.fsencode(m.mountpoint) == where or os.fsencode(m.mountpoint).startswith(where + b"/")]
            if mounted:
                raise ExtractError(f"{show_path(where)}: in the way, and a filesystem is mounted on "
                                   f"{show_path(os.fsencode(mounted[0]))}; cafs get never removes it")
            if not self.as_root:
                _let_owner_empty(dir_fd, name)
        _remove(dir_fd, name, st)

    def _set_attrs(self, fd: int, entry: Entry) -> None:
        """Owner (as root), mode and mtime, each only if it differs: changing any needs
        to own the file, which a re-run by another user does not."""
        st = os.fstat(fd)
        chowned = self.as_root and (st.st_uid, st.st_gid) != (entry.uid, entry.gid)
        if chowned:
            os.chown(fd, entry.uid, entry.gid)  # which clears setuid and setgid bits
        if chowned or stat.S_IMODE(st.st_mode) != entry.mode:
            os.chmod(fd, entry.mode)
        if st.st_mtime_ns != entry.mtime_ns:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))


def _link_key(entry: Entry) -> tuple[object, ...]:
    """What names of one imported file share: the source's inode number and link count,
    and equal content and attributes (so names that were not links, from another
    filesystem with the same inode number, are never joined unless they are identical)."""
    return (entry.ino, entry.nlink, entry.size, entry.mode, entry.uid, entry.gid, entry.mtime_ns,
            entry.spans, entry.ref)


@dataclass
class _Level:
    """A directory being filled: open (``CLOSED`` while the walk is more than
    ``OPEN_DIRS`` levels below), its entry, its path for messages, what is left of it."""

    fd: int
    dev_ino: tuple[int, int]
    entry: Entry
    path: Path
    children: Iterator[Entry]


@dataclass
class _LinkGroup:
    fd: int  # an O_PATH descriptor of the file extracted first
    dev_ino: tuple[int, int]
    left: int  # names of it still to come


def _remove(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Remove what ``st`` says is at ``name``: a directory with all it holds."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _let_owner_empty(dir_fd: int, name: bytes) -> None:
    """Give read, write and search back to their owner on the directory at ``name`` and
    on every directory below it that lacks them and is ours (an earlier run gave them the
    snapshot's modes, 0o555 or 0o111 say), so that what they hold can be removed. Others'
    are left as they are: removing them then fails, naming the path."""
    try:
        _add_owner_bits(name, dir_fd, stat.S_IRWXU, directory=True)
    except PermissionError:
        return
    for _top, subdirs, _files, fd in os.fwalk(name, dir_fd=dir_fd):  # top-down: before each is entered
        for sub in subdirs:
            st = _lstat(fd, sub)
            if st is not None and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IRWXU != stat.S_IRWXU:
                try:
                    _add_owner_bits(sub, fd, stat.S_IRWXU, directory=True)
                except PermissionError:
                    pass


def _add_owner_bits(name: bytes | Path, dir_fd: int | None, bits: int, *, directory: bool) -> None:
    """Add ``bits`` to the mode of the regular file or directory at ``name`` (never a
    symlink), which need not be readable: through an ``O_PATH`` descriptor. Raises
    PermissionError if it is not ours, or not of that type."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode) | bits)
    finally:
        os.close(fd)


def _dev_ino(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Chunk:
    """A chunk's id and verified bytes; whether they are all zeros, found on first ask."""

    def __init__(self, chunk_id: bytes, data: bytes) -> None:
        self.id = chunk_id
        self.data = data
        self._zeros: bool | None = None

    @property
    def zeros(self) -> bool:
        if self._zeros is None:
            self._zeros = self.data.count(0) == len(self.data)
        return self._zeros


def _write_leaving_holes(fd: int, data: bytes, pos: int) -> None:
    """Write ``data`` at ``pos``, where the file holds nothing yet, except its pieces of
    zeros between ``HOLE_BLOCK`` boundaries of the file, which are left as holes (``cp
    --sparse``): a chunk is up to a few MiB, and a sparse file's data is often much less
    than that apart."""
    view = memoryview(data)
    start = 0  # of what is still to be written
    i = 0
    while i < len(view):
        j = min(len(view), i + HOLE_BLOCK - (pos + i) % HOLE_BLOCK)  # the next boundary
        if view[i:j] == _ZERO_BLOCK[:j - i]:
            if i > start:
                pwrite_all(fd, view[start:i], pos + start)
            start = j
        i = j
    if start < len(view):
        pwrite_all(fd, view[start:], pos + start)


def _no_data_in(fd: int, start: int, length: int) -> bool:
    """Whether bytes ``[start, start + length)`` of ``fd`` are a hole, which reads as
    zeros. False where the filesystem cannot tell (it then reports data everywhere)."""
    try:
        return os.lseek(fd, start, os.SEEK_DATA) >= start + length
    except OSError as exc:
        return exc.errno == errno.ENXIO  # no data from start to the end of the file


def _lstat(dir_fd: int, name: bytes) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _os_error(exc: OSError, path: Path) -> CafsError:
    shown = show_path(os.fsencode(path))  # one line, whatever the snapshot's names hold
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"{shown}: no space left on device")
    return ExtractError(f"{shown}: {exc.strerror or exc}")

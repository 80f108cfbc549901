"""Importing a directory tree into a repository as a new snapshot of a ref.

Contract:

- The tree is walked through directory file descriptors (``openat``-style, ``O_NOFOLLOW``),
  so no symlink is ever followed and path length is not limited by PATH_MAX; only the
  deepest levels' directories are held open (``cafs.dirfds``), so depth is not limited
  by the number of open files either. The directory given on the command line may itself
  be a symlink to a directory.
- Each directory's entries are processed in bytewise name order, so the files of a
  directory land in packs in name order (reading a directory in order is a sequential
  pass over its packs).
- Files are cut with FastCDC; each chunk's BLAKE3 id is looked up in the repository's
  index and only new chunks are stored (zstd where it saves space). Files up to
  ``WHOLE_READ_MAX`` are read, cut, hashed and compressed on worker threads
  (``cafs.chunkprep``), a few at once (at most ``PENDING_BYTES`` of them); larger ones are
  cut on the importing thread and their chunks hashed and compressed on the workers. The
  chunks are stored by the importing thread in the order the walk met their files, so
  the packs are what a serial import writes, but for the random pack ids. A file whose size,
  mtime_ns and inode equal those recorded in the previous snapshot of the ref is not
  read again: its spans are reused, unless its mtime is a whole second within
  ``COARSE_MTIME_NS`` (2 s) before that snapshot's import began, up to now:
  a filesystem that keeps whole seconds or two (FAT, ext3, HFS+, many network ones)
  gives a file written again in the same second the same mtime, so such a file is read
  again once. The previous snapshot's entries are compared in the
  form msgpack gives them (``entry_fields``) and are never decoded: a changed
  directory's node holds its unchanged entries as the previous node held them
  (``encode_tree``), and a directory whose entries are all unchanged keeps its node.
- Holes of a sparse file at least twice the maximum chunk size are not read: they are
  cut into the chunks of zeros a dense copy would give (``cafs.sparse``), so both are
  stored alike; ``Counters.hole_bytes`` counts them apart from ``read_bytes``.
- A file that cannot be read, changes while being read (size or mtime differ before and
  after, or the bytes read differ from the size), has more chunks than one file node may
  list (``MAX_SPANS``, or a node over ``MAX_OBJECT_BYTES``: some 850,000 chunks, a sparse
  file of terabytes say; readers refuse such a node, and with it the directory holding
  it), or is not a regular file, directory or symlink is reported in
  ``ImportResult.skipped`` with its path and left out of the snapshot. With ``strict``
  the import raises ``ImportAborted`` before committing.
- The directories this import writes, the repository (on a local disk) and its metadata
  cache, are never imported: when the tree holds them they are left out (each named in
  ``ImportResult.left_out``), else every import would store the packs the one before it
  wrote. A tree inside either is refused (``UsageError``).
- Crash safety: packs are immutable and written before the index object, which is
  written before the journal entry that commits the ref. An import killed at any point
  leaves the ref as it was; packs it stored are found again (by their trailers) and
  reused by the next import, so nothing is uploaded twice beyond the pack being written.

Caveats: extended attributes, ACLs, atimes and ctimes are not recorded. A hard-linked
file is stored once; each of its names becomes an entry with the same content and the
link count seen on the source (a name met after the file was written, its size or mtime
no longer those its first name was read with, is read again). An mtime outside int64 nanoseconds (after 2262 or before
1677) is recorded clamped to that range.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from functools import cached_property
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable

from cafs.chunkprep import ChunkPrep, FileCut, Prepared
from cafs.dirfds import CLOSED, close_above, open_below, open_parent
from cafs.errors import CafsError, FormatError, UsageError
from cafs.format import ENTRY_BLOCKS_SINCE
from cafs.format.journal import Snapshot
from cafs.format.location import Location, decode_location
from cafs.format.nodes import (
    INLINE_SPANS, INT64, KIND_DIR, KIND_FILE, KIND_SYMLINK, MAX_NAME, MAX_SPANS, MAX_TARGET, PAGE_ENTRIES,
    F_BLOCKS, F_CONTENT, F_GID, F_INO, F_KIND, F_MODE, F_MTIME, F_NAME, F_NLINK, F_SIZE, F_UID,
    DirIndexNode, Entry, FileNode, Node, PageRef, decode_entry, encode_node, encode_tree, entry_fields,
)
from cafs.format.pack import KIND_DATA, KIND_META
from cafs.format.strict import MAX_OBJECT_BYTES
from cafs.ids import digest
from cafs.locks import HeldLock, locked
from cafs.metacache import MetaCache, MetaCacheError, NodeReader
from cafs.packwriter import PackWriter, Uploader, target_size
from cafs.repository import ObjectIndex, Repository
from cafs.sparse import FdReader, ZeroRun, cut, holes, zeros_cut_at_max
from cafs.tree import show_path

if TYPE_CHECKING:
    from pyfastcdc import Chunk, FastCDC

    from cafs.codec import Compressor

NODE_BATCH = 2000
WHOLE_READ_MAX = 16 << 20  # files up to this size are read in one go and cut in memory
PENDING_BYTES = 128 << 20  # of files being read on the workers at once (their read buffers)
_NOATIME = getattr(os, "O_NOATIME", 0)
COARSE_MTIME_NS = 2_000_000_000  # the coarsest mtimes a filesystem keeps (FAT's two seconds)


class ImportAborted(CafsError):
    """``--strict`` import found paths it could not import; nothing was committed."""


@dataclass
class Skipped:
    path: bytes
    reason: str

    def describe(self) -> str:
        """``'path': reason`` on one line, the path as ``show_path`` gives it (so a byte
        0xff and the four characters ``\\xff`` differ) with ``'`` escaped too."""
        return "'" + show_path(self.path).replace("'", "\\'") + f"': {self.reason}"


@dataclass
class Counters:
    """Progress of a running import; written by the importer, read by a progress view."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    logical: int = 0  # logical bytes of files done or in progress
    read_bytes: int = 0  # bytes actually read from the source
    hole_bytes: int = 0  # bytes of sparse files' holes cut as zeros without reading
    new_bytes: int = 0  # plain bytes of chunks not yet in the repository
    reused_files: int = 0
    skipped: int = 0
    current: bytes = b""


@dataclass
class ImportResult:
    snapshot: Snapshot | None
    counters: Counters
    skipped: list[Skipped]
    stored_bytes: int  # bytes of packs written by this import
    packs: int
    seconds: float
    left_out: list[Skipped] = field(default_factory=list)  # the repository or cache inside the tree


# An entry of the previous snapshot as ``entry_fields`` gives it: compared, not decoded.
PrevEntry = list[Any]


@dataclass
class _DirFrame:
    fd: int  # CLOSED while the walk is more than OPEN_DIRS levels below
    name: bytes  # in its parent; b"" for the root
    parent: _DirFrame | None
    st: os.stat_result
    names: list[bytes]
    prev: dict[bytes, PrevEntry]  # the previous snapshot's entries of this directory
    prev_dir: Entry | PrevEntry | None  # this directory's own entry there
    prev_ref: Location | None  # and its node
    pos: int = 0
    # a PrevEntry is unchanged; a _PendingFile is being read, and is replaced by its entry
    # (None: skipped) once settled
    entries: list[Entry | PrevEntry | _PendingFile | None] = field(default_factory=list)
    subdirs: int = 0
    _path: bytes | None = None  # kept while this is the deepest frame (see ``path``)

    @property
    def path(self) -> bytes:
        """Its path in the imported tree, made from the names up the walk. Only the deepest
        frame keeps it (``forget_path``): kept by every frame, the paths of a tree 2,000
        deep with names of 255 bytes took 500 MB (the sum of their lengths grows with the
        square of the depth)."""
        if self._path is None:
            names, frame = [], self
            while frame.parent is not None:
                names.append(frame.name)
                frame = frame.parent
            self._path = b"/".join(reversed(names))
        return self._path

    def forget_path(self) -> None:
        self._path = None


@dataclass
class _PendingFile:
    """A file being read and cut on a worker; settled, its entry takes its place."""

    name: bytes
    path: bytes
    st: os.stat_result
    fd: int  # open until settled
    job: Future[FileCut]
    # the list and index where it waits in its directory's entries: settled, it leaves
    # its entry there and goes. Kept there, each file read held its job, its stat results
    # and its path (some 4 KB) until the directory was done: 450 MB for a directory of
    # 100,000 files, 4 GB for one of a million.
    place: tuple[list[Entry | PrevEntry | _PendingFile | None], int] | None = None

    def settle(self, entry: Entry | None) -> None:
        """Leave ``entry`` (None: skipped) in this file's place."""
        if self.place is not None:
            entries, index = self.place
            entries[index] = entry
            self.place = None


class Importer:
    def __init__(self, repo: Repository, meta: MetaCache, load_index: Callable[[], ObjectIndex],
                 uploader: Uploader, reader: NodeReader, prev: Snapshot | None,
                 own_dirs: dict[tuple[int, int], str] | None = None) -> None:
        self.repo = repo
        self.own_dirs = own_dirs or {}  # (st_dev, st_ino) of what this import writes: what it is
        self.left_out: list[Skipped] = []
        self.meta: MetaCache | None = meta  # None once it failed: the nodes are in the repository anyway
        self._load_index = load_index
        self._index: ObjectIndex | None = None
        self.reader = reader
        self.prev = prev
        # whole-second mtimes in this range may hide a write after ``prev`` read the file
        self._racy = (trusted_before(prev), time.time_ns())
        self.counters = Counters()
        self.skipped: list[Skipped] = []
        self.max_chunk = repo.config.chunker.max_size
        self._zero_chunks: bool | None = None  # whether zeros cut at max_chunk (sparse.py)
        self._zero_chunk: Location | None = None  # where that chunk of zeros is stored
        self.data = PackWriter(uploader, KIND_DATA, target_size(KIND_DATA, repo.config.pack_size))
        self.meta_packs = PackWriter(uploader, KIND_META, target_size(KIND_META, repo.config.pack_size))
        self._node_batch: list[tuple[bytes, bytes]] = []
        # a hard-linked file read once, by (st_dev, st_ino): its spans or node, and the
        # (size, mtime_ns) they are the content of
        self._links: dict[tuple[int, int], tuple[tuple[Location, ...] | None, Location | None, tuple[int, int]]] = {}
        self._pending: deque[_PendingFile] = deque()  # files being read on the workers, oldest first
        self._with_blocks = repo.config.version >= ENTRY_BLOCKS_SINCE  # older readers take ten fields

    # The chunker and the compressor (and their modules) are made on first use: a
    # re-import of an unchanged tree needs neither, and is mostly start-up time.
    @cached_property
    def cdc(self) -> FastCDC:
        from pyfastcdc import FastCDC
        p = self.repo.config.chunker
        return FastCDC(avg_size=p.avg_size, min_size=p.min_size, max_size=p.max_size)

    @cached_property
    def compressor(self) -> Compressor:
        from cafs.codec import Compressor
        return Compressor()

    @cached_property
    def prep(self) -> ChunkPrep:
        return ChunkPrep(self.cdc, self.objects, PENDING_BYTES)

    def close(self) -> None:
        """Stop the workers and close the files still being read (an import that failed)."""
        for p in self._pending:
            p.job.cancel()
        if "prep" in self.__dict__:
            self.prep.close()
        for p in self._pending:
            os.close(p.fd)
        self._pending.clear()

    @property
    def objects(self) -> dict[bytes, Location]:
        """Every object in the repository, by id. Loaded on first use: re-importing an
        unchanged tree never needs it."""
        if self._index is None:
            self._index = self._load_index()
        return self._index.objects

    # -- the walk -----------------------------------------------------------------

    def import_tree(self, src: Path) -> Entry:
        """Import ``src`` and return the root entry; packs may still be uploading."""
        try:
            root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise UsageError(f"{src}: cannot open the directory to import: {exc.strerror}") from None
        try:
            root_st = os.fstat(root_fd)
            prev_root = self.prev.root if self.prev else None
            stack = [self._frame(root_fd, b"", None, root_st, prev_root, prev_root.ref if prev_root else None)]
        except BaseException:
            os.close(root_fd)
            raise
        root: Entry | None = None
        try:
            while stack:
                top = stack[-1]
                child = self._import_entries(top)
                if child is not None:
                    top.forget_path()
                    stack.append(child)
                    close_above(stack, first=1)  # the root stays open
                    continue
                stack.pop()
                try:
                    entry = self._finish_dir(top)
                    if stack and stack[-1].fd == CLOSED:
                        self._reopen(stack[-1], top.fd, stack[0].fd)
                finally:
                    if top.fd != CLOSED:
                        os.close(top.fd)
                if stack:
                    stack[-1].entries.append(entry)
                    stack[-1].subdirs += 1
                else:
                    assert isinstance(entry, Entry)  # the root's previous entry is an Entry
                    root = entry
        finally:
            for frame in stack:
                if frame.fd != CLOSED:
                    os.close(frame.fd)
        assert root is not None
        self.data.seal()
        self.meta_packs.seal()
        self._flush_nodes()
        return root

    def _reopen(self, frame: _DirFrame, child_fd: int, root_fd: int) -> None:
        """Open ``frame``'s directory again (closed while the walk was deeper): from the
        subdirectory ``child_fd`` the walk leaves (CLOSED if it was not found again
        either), else by its path below the root; if it is not there any more, or cannot
        be opened, the entries of ``frame`` not yet imported are skipped."""
        want = (frame.st.st_dev, frame.st.st_ino)
        why = "moved elsewhere while being imported"
        try:
            fd = open_parent(child_fd, want) if child_fd != CLOSED else None
        except OSError:
            fd = None
        try:
            if fd is None:
                fd = open_below(root_fd, frame.path.split(b"/"), want)
        except OSError as exc:
            why = f"cannot open directory again: {exc.strerror}"
        if fd is not None:
            frame.fd = fd
        elif frame.pos < len(frame.names):
            self._skip(frame.path, f"{why}; its entries from '{show_path(frame.names[frame.pos])}' on are left out")
            frame.pos = len(frame.names)

    def _frame(self, fd: int, name: bytes, parent: _DirFrame | None, st: os.stat_result,
               prev: Entry | PrevEntry | None, prev_ref: Location | None) -> _DirFrame:
        names = _names(fd)
        prev_entries: dict[bytes, PrevEntry] = {}
        if prev_ref is not None:
            try:
                prev_entries = {e[F_NAME]: e for e in self._prev_fields(prev_ref)}
            except CafsError:
                prev_ref = None  # an unreadable previous snapshot only costs re-reading
        self.counters.dirs += 1
        return _DirFrame(fd, name, parent, st, names, prev_entries, prev if prev_ref else None, prev_ref)

    def _prev_fields(self, ref: Location) -> list[PrevEntry]:
        """The entries of a previous directory node, or of all the pages of its index."""
        what = f"node {ref.id.hex()[:12]}"
        fields = entry_fields(self.reader.node_bytes(ref), what)
        if fields is not None:
            return fields
        index = self.reader.node(ref)
        if not isinstance(index, DirIndexNode):
            raise FormatError(f"{what} is not a directory node")
        out: list[PrevEntry] = []
        for page in index.pages:
            page_fields = entry_fields(self.reader.node_bytes(page.ref), what)
            if page_fields is None:
                raise FormatError(f"{what}: page {page.ref.id.hex()[:12]} is not a tree node")
            out.extend(page_fields)
        return out

    def _skip(self, path: bytes, reason: str) -> None:
        self.skipped.append(Skipped(path, reason))
        self.counters.skipped += 1

    def _import_entries(self, frame: _DirFrame) -> _DirFrame | None:
        """Import the entries of ``frame`` from where it stopped: up to its end (None),
        or up to a subdirectory, whose frame is returned to be walked first."""
        names, entries, prev, fd = frame.names, frame.entries, frame.prev, frame.fd
        self.counters.current = frame.path
        while frame.pos < len(names):
            name = names[frame.pos]
            frame.pos += 1
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError as exc:
                self._skip(_join(frame, name), "vanished while importing" if isinstance(exc, FileNotFoundError)
                           else f"cannot stat: {exc.strerror}")
                continue
            old = prev.get(name)
            if (old is not None and stat.S_ISREG(st.st_mode)
                    and _unchanged_file(old, st, self._blocks(st), self._racy)):
                self._count_reused(st)  # the common case of a re-import: taken as it was
                entries.append(old)
                continue
            child = self._import_entry(frame, name, st)
            if isinstance(child, _DirFrame):
                return child
            if isinstance(child, _PendingFile):
                child.place = (entries, len(entries))
            if child is not None:
                entries.append(child)
        return None

    def _import_entry(self, parent: _DirFrame, name: bytes,
                      st: os.stat_result) -> Entry | PrevEntry | _DirFrame | _PendingFile | None:
        path = _join(parent, name)
        if len(name) > MAX_NAME:
            self._skip(path, "name longer than 255 bytes")
            return None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            own = self.own_dirs.get((st.st_dev, st.st_ino))
            if own is not None:
                self.left_out.append(Skipped(path, f"{own}, which this import writes"))
                return None
            return self._open_dir(parent, name, path, st)
        if stat.S_ISREG(mode):
            return self._import_file(parent, name, path, st)
        if stat.S_ISLNK(mode):
            return self._import_symlink(parent, name, path, st)
        kind = ("fifo" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
        self._skip(path, f"{kind}: only files, directories and symlinks are imported")
        return None

    def _open_dir(self, parent: _DirFrame, name: bytes, path: bytes, st: os.stat_result) -> _DirFrame | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent.fd)
        except OSError as exc:
            self._skip(path, _not_opened(exc, "cannot open directory", _REPLACED_OPEN))
            return None
        try:
            prev = parent.prev.get(name)
            return self._frame(fd, name, parent, os.fstat(fd), prev, _dir_ref(prev))
        except OSError as exc:
            os.close(fd)
            self._skip(path, f"cannot list directory: {exc.strerror}")
            return None

    def _finish_dir(self, frame: _DirFrame) -> Entry | PrevEntry:
        self._settle_all()
        entries: list[Entry | PrevEntry] = []
        for e in frame.entries:
            assert not isinstance(e, _PendingFile), "a settled file leaves its entry in its place"
            if e is not None:
                entries.append(e)
        if (frame.prev_ref is not None and len(entries) == len(frame.prev)
                and all(type(e) is list for e in entries)):
            ref = frame.prev_ref  # every entry is the previous snapshot's own: so is the node
        else:
            ref = self._store_dir(entries)
        st = frame.st
        name = frame.name
        return _same_or_new(frame.prev_dir, Entry(
            name, KIND_DIR, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _mtime_ns(st), len(entries),
            2 + frame.subdirs, st.st_ino, ref=ref, blocks=self._blocks(st)))

    def _store_dir(self, entries: list[Entry | PrevEntry]) -> Location:
        # Unchanged entries go into the new node as the previous snapshot's node held
        # them, undecoded (encode_tree): a changed directory costs its new entries only.
        if len(entries) <= PAGE_ENTRIES:
            return self._store_node_bytes(encode_tree(entries))
        pages = []
        for i in range(0, len(entries), PAGE_ENTRIES):
            page = entries[i:i + PAGE_ENTRIES]
            first = page[0][F_NAME] if isinstance(page[0], list) else page[0].name
            pages.append(PageRef(first, len(page), self._store_node_bytes(encode_tree(page))))
        return self._store_node(DirIndexNode(tuple(pages)))

    def _import_symlink(self, parent: _DirFrame, name: bytes, path: bytes,
                        st: os.stat_result) -> Entry | PrevEntry | None:
        try:
            target = os.readlink(name, dir_fd=parent.fd)
        except OSError as exc:
            self._skip(path, _not_opened(exc, "cannot read symlink", (errno.EINVAL,)))  # EINVAL: no symlink
            return None
        target_b = os.fsencode(target)
        if not 1 <= len(target_b) <= MAX_TARGET:
            self._skip(path, f"symlink target of {len(target_b)} bytes is outside 1-{MAX_TARGET}")
            return None
        self.counters.symlinks += 1
        return _same_or_new(parent.prev.get(name), Entry(
            name, KIND_SYMLINK, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _mtime_ns(st),
            len(target_b), st.st_nlink, st.st_ino, target=target_b, blocks=self._blocks(st)))

    # -- files --------------------------------------------------------------------

    def _file_entry(self, name: bytes, st: os.stat_result, spans: tuple[Location, ...] | None,
                    ref: Location | None) -> Entry:
        return Entry(name, KIND_FILE, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, _mtime_ns(st),
                     st.st_size, st.st_nlink, st.st_ino, spans=spans, ref=ref, blocks=self._blocks(st))

    def _blocks(self, st: os.stat_result) -> int | None:
        """What an entry records of ``st_blocks``: nothing in a repository of a format
        older than entries with blocks."""
        return st.st_blocks if self._with_blocks else None

    def _import_file(self, parent: _DirFrame, name: bytes, path: bytes,
                     st: os.stat_result) -> Entry | PrevEntry | _PendingFile | None:
        c = self.counters
        c.current = path
        prev = parent.prev.get(name)
        if prev is not None and _same_content(prev, st, self._racy):
            try:  # the same content with other metadata (mode, owner, links)
                old = decode_entry(prev, "entry")
            except FormatError:
                pass  # read the file again
            else:
                self._count_reused(st)
                return self._file_entry(name, st, old.spans, old.ref)
        link_key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and any((p.st.st_dev, p.st.st_ino) == link_key for p in self._pending):
            self._settle_all()  # its other name is being read: take what that gives
        if st.st_nlink > 1 and link_key in self._links:
            spans, ref, seen = self._links[link_key]
            if seen == (st.st_size, st.st_mtime_ns):  # not written since its other name was read
                c.files += 1
                c.logical += st.st_size
                return self._file_entry(name, st, spans, ref)
        if st.st_size > WHOLE_READ_MAX:
            self._settle_all()  # its chunks go into the packs after those of the files before it
            try:
                return self._file_done(name, path, st, self._read_large_file(parent.fd, name, st))
            except _FileSkipped as why:
                self._skip(path, str(why))
                return None
        return self._read_in_background(parent, name, path, st)

    def _read_in_background(self, parent: _DirFrame, name: bytes, path: bytes,
                            st: os.stat_result) -> _PendingFile | None:
        """Open a file of at most WHOLE_READ_MAX bytes and have a worker read it, once
        the files already in flight leave room for it; None if it is skipped."""
        while self._pending and (len(self._pending) >= self.prep.window
                                 or sum(p.st.st_size for p in self._pending) + st.st_size > PENDING_BYTES):
            self._settle_one()
        try:
            fd = _open_file(parent.fd, name)
        except _FileSkipped as why:
            self._skip(path, str(why))
            return None
        try:
            _check_opened(fd, st)
            pending = _PendingFile(name, path, st, fd, self.prep.file(fd, st.st_size))
        except BaseException as exc:
            os.close(fd)
            if not isinstance(exc, _FileSkipped):
                raise
            self._skip(path, str(exc))
            return None
        self._pending.append(pending)
        return pending

    def _file_done(self, name: bytes, path: bytes, st: os.stat_result, spans_list: list[Location]) -> Entry | None:
        """The entry of a file read as ``spans_list``, or None if it cannot be one."""
        c = self.counters
        if len(spans_list) <= INLINE_SPANS:
            spans, ref = tuple(spans_list), None
        else:
            node = encode_node(FileNode(tuple(spans_list))) if len(spans_list) <= MAX_SPANS else b""
            if not 0 < len(node) <= MAX_OBJECT_BYTES:
                c.logical -= st.st_size  # its chunks stay unreferenced: gc removes them
                self._skip(path, f"{len(spans_list)} chunks: more than one file node may list; "
                                 "import it into a repository with larger chunks")
                return None
            spans, ref = None, self._store_node_bytes(node)
        if st.st_nlink > 1:
            self._links[(st.st_dev, st.st_ino)] = (spans, ref, (st.st_size, st.st_mtime_ns))
        c.files += 1
        return self._file_entry(name, st, spans, ref)

    def _count_reused(self, st: os.stat_result) -> None:
        c = self.counters
        c.files += 1
        c.reused_files += 1
        c.logical += st.st_size

    # Files up to WHOLE_READ_MAX are read, cut, hashed and compressed on the workers of
    # ``prep``, several at once; their chunks are stored here, in the order the files
    # were met (``_settle_one``), so packs hold a directory's files in name order.

    def _settle_one(self) -> None:
        """Store the chunks of the oldest file being read and make its entry."""
        p = self._pending[0]
        # The file stays pending until its job is done: if this wait is interrupted
        # (Ctrl-C), close() closes the file once the workers stopped, not under a worker
        # still reading it (whose descriptor another open could then reuse).
        cut = p.job.result()
        self._pending.popleft()
        os.close(p.fd)
        entry = None
        try:
            if cut.error is not None or cut.after is None:
                self._skip(p.path, f"cannot read: {cut.error.strerror if cut.error else 'no answer'}")
                return
            spans = self._store_prepared(cut.chunks)
            if (why := _change(p.st, cut.after, spans)) is not None:
                self._skip(p.path, why)
                return
            entry = self._file_done(p.name, p.path, p.st, spans)
        finally:
            cut.release()
            p.settle(entry)

    def _settle_all(self) -> None:
        while self._pending:
            self._settle_one()

    def _read_large_file(self, dir_fd: int, name: bytes, st: os.stat_result) -> list[Location]:
        """The spans of a file larger than WHOLE_READ_MAX, cut here as it is read; its
        chunks are hashed and compressed on the workers."""
        fd = _open_file(dir_fd, name)
        try:
            _check_opened(fd, st)
            spans = self._store_prepared(self.prep.in_order(self._cut_large(fd, st.st_size)))
            after = os.fstat(fd)
        except OSError as exc:
            raise _FileSkipped(f"cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        if (why := _change(st, after, spans)) is not None:
            raise _FileSkipped(why)
        return spans

    def _cut_large(self, fd: int, size: int) -> Iterable[Chunk | ZeroRun]:
        gaps = holes(fd, size, 2 * self.max_chunk)
        if gaps and self._zeros_cut_at_max():
            return cut(self.cdc, fd, self.max_chunk, gaps)
        return self.cdc.cut_stream(FdReader(fd))

    def _zeros_cut_at_max(self) -> bool:
        if self._zero_chunks is None:
            self._zero_chunks = zeros_cut_at_max(self.cdc, self.max_chunk)
        return self._zero_chunks

    def _store_prepared(self, chunks: Iterable[Prepared | ZeroRun]) -> list[Location]:
        c = self.counters
        spans: list[Location] = []
        for chunk in chunks:
            if isinstance(chunk, ZeroRun):
                if self._zero_chunk is None:  # hashed once, not once per hole
                    self._zero_chunk = self._store_chunk(bytes(self.max_chunk))
                spans += [self._zero_chunk] * chunk.count
                c.logical += chunk.count * self.max_chunk
                c.hole_bytes += chunk.count * self.max_chunk
                continue
            loc = self.objects.get(chunk.oid)
            if loc is None:
                assert chunk.stored is not None, "an id the index held is never dropped from it"
                loc = self.data.add(chunk.oid, chunk.stored, chunk.length, chunk.codec)
                self.objects[chunk.oid] = loc
                c.new_bytes += chunk.length
            spans.append(loc)
            c.logical += chunk.length
            c.read_bytes += chunk.length
        return spans

    def _store_chunk(self, data: bytes | memoryview) -> Location:
        _, loc, new = self._store_object(data, self.data)
        if new:
            self.counters.new_bytes += len(data)
        return loc

    def _store_object(self, data: bytes | memoryview, packs: PackWriter) -> tuple[bytes, Location, bool]:
        """``data``'s id and location, and whether it was new: added to ``packs`` unless
        the repository holds it already."""
        oid = digest(data)
        loc = self.objects.get(oid)
        if loc is not None:
            return oid, loc, False
        codec, stored = self.compressor.encode(data)
        loc = packs.add(oid, stored, len(data), codec)
        self.objects[oid] = loc
        return oid, loc, True

    # -- nodes --------------------------------------------------------------------

    def _store_node(self, node: Node) -> Location:
        return self._store_node_bytes(encode_node(node))

    def _store_node_bytes(self, data: bytes) -> Location:
        nid, loc, _ = self._store_object(data, self.meta_packs)
        self._node_batch.append((nid, data))
        if len(self._node_batch) >= NODE_BATCH:
            self._flush_nodes()
        return loc

    def _flush_nodes(self) -> None:
        batch, self._node_batch = self._node_batch, []
        if self.meta is None:
            return
        try:
            self.meta.put_many(batch)
        except MetaCacheError as exc:
            self.reader.give_up_cache(exc)
            self.meta = None


def _same_or_new(prev: Entry | PrevEntry | None, new: Entry) -> Entry | PrevEntry:
    """``prev`` itself if ``new`` equals it: a PrevEntry then tells an unchanged entry."""
    if type(prev) is list:
        return prev if prev == new.encode() else new
    return prev if prev is not None and prev == new else new


def _join(parent: _DirFrame, name: bytes) -> bytes:
    """The path of ``name`` in ``parent``, relative to the imported tree (for messages)."""
    return parent.path + b"/" + name if parent.path else name


def trusted_before(prev: Snapshot | None) -> int:
    """The time before which a whole-second mtime recorded in ``prev`` is trusted: when
    its import began (``started_ns`` in its stats; its commit time for snapshots written
    before imports recorded that), less ``COARSE_MTIME_NS``."""
    if prev is None:
        return INT64[0]
    return prev.stats.get("started_ns", prev.time_ns) - COARSE_MTIME_NS


def _same_content(prev: PrevEntry, st: os.stat_result, racy: tuple[int, int]) -> bool:
    """Whether a previous file entry has the size, inode and mtime the file has now: the
    sign that its content was not written since (as restic and rsync take it). Not for
    a whole-second mtime from ``COARSE_MTIME_NS`` before the previous import began up to
    now (``racy``): on a filesystem keeping whole seconds (FAT: 2 s) a write just after
    that import read the file leaves the mtime as it was. (A date past now, 2100 say,
    is no write's since then.)"""
    mtime = prev[F_MTIME]
    return bool(prev[F_SIZE] == st.st_size and prev[F_INO] == st.st_ino and prev[F_KIND] == KIND_FILE
                and (mtime == st.st_mtime_ns or mtime == _mtime_ns(st))
                and (mtime % 1_000_000_000 != 0 or not racy[0] <= mtime <= racy[1]))


def _unchanged_file(prev: PrevEntry, st: os.stat_result, blocks: int | None, racy: tuple[int, int]) -> bool:
    """Whether a previous file entry is exactly what the file's entry would be now, with
    ``blocks`` what it records of ``st_blocks``."""
    return (_same_content(prev, st, racy) and prev[F_MODE] == stat.S_IMODE(st.st_mode)
            and prev[F_UID] == st.st_uid and prev[F_GID] == st.st_gid and prev[F_NLINK] == st.st_nlink
            and (prev[F_BLOCKS] if len(prev) > F_BLOCKS else None) == blocks)


def _dir_ref(prev: PrevEntry | None) -> Location | None:
    """The node of a previous directory entry, or None if it was not a directory."""
    if prev is None or prev[F_KIND] != KIND_DIR:
        return None
    try:
        return decode_location(prev[F_CONTENT], "entry")
    except FormatError:
        return None


def _names(dir_fd: int) -> list[bytes]:
    """The names in a directory, as bytes, in bytewise order."""
    try:  # listing by a bytes path gives bytes names: no decoding and encoding each one
        return sorted(os.listdir(b"/proc/self/fd/%d" % dir_fd))
    except FileNotFoundError:  # no /proc
        return sorted(os.fsencode(n) for n in os.listdir(dir_fd))


def _mtime_ns(st: os.stat_result) -> int:
    """The mtime an entry records: clamped to int64 nanoseconds (years 1677-2262), as the
    kernel clamps a time a filesystem cannot hold. Unclamped, a file dated later (ext4
    holds up to 2446) would make its directory node, and so the snapshot, undecodable."""
    return min(max(st.st_mtime_ns, INT64[0]), INT64[1])


class _FileSkipped(Exception):
    pass


CHANGED = "changed while being read (size or mtime differ before and after)"


def _check_opened(fd: int, st: os.stat_result) -> None:
    """That the file opened is the one ``st`` was taken of."""
    try:
        before = os.fstat(fd)
    except OSError as exc:
        raise _FileSkipped(f"cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode) or before.st_ino != st.st_ino:
        raise _FileSkipped("replaced while importing")


def _change(st: os.stat_result, after: os.stat_result, spans: list[Location]) -> str | None:
    """Why a file read as ``spans`` is not the file ``st`` was taken of (before it was
    opened; ``after`` once read), or None if it is. A file whose size and mtime stayed as
    they were but that reads another number of bytes is no ordinary file (a /proc or /sys
    file says 0 or 4096 and reads what it holds now)."""
    total = sum(s.length for s in spans)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return CHANGED
    if total != st.st_size:
        return (f"reads {total} bytes where its size says {st.st_size} (a /proc or /sys file?); "
                "copy it to an ordinary file to import it")
    return None


def _open_file(dir_fd: int, name: bytes) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        return os.open(name, flags | _NOATIME, dir_fd=dir_fd)
    except PermissionError:
        if not _NOATIME:
            raise _FileSkipped("permission denied") from None
    except OSError as exc:
        raise _FileSkipped(_not_opened(exc, "cannot open", _REPLACED_OPEN)) from None
    try:  # O_NOATIME needs ownership; retry without it
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise _FileSkipped(_not_opened(exc, "cannot open", _REPLACED_OPEN)) from None


# what opening a name with O_NOFOLLOW (and O_DIRECTORY for a directory) gives when it
# is now a symlink (ELOOP) or, where a directory was, something else (ENOTDIR)
_REPLACED_OPEN = (errno.ELOOP, errno.ENOTDIR)


def _not_opened(exc: OSError, doing: str, replaced: tuple[int, ...]) -> str:
    """Why a name stat'ed a moment before could not be opened or read: it vanished, or
    was replaced by something else (errnos ``replaced``) meanwhile; else ``exc`` itself."""
    if isinstance(exc, FileNotFoundError):
        return "vanished while importing"
    if exc.errno in replaced:
        return "replaced while importing"
    return f"{doing}: {exc.strerror}"


def run_import(repo: Repository, meta: MetaCache, src: Path, ref: str, *, strict: bool = False,
               reread: bool = False, counters_out: list[Counters] | None = None,
               on_problem: Callable[[str], None] | None = None) -> ImportResult:
    """Import ``src`` as a new snapshot of ``ref``; see the module docstring. With
    ``reread``, nothing is taken from the previous snapshot: every file is read, and every
    chunk and node the index lacks is stored (what ``fsck --repair`` found lost)."""
    started = time.monotonic()
    started_ns = time.time_ns()
    if not src.is_dir():
        raise UsageError(f"{src}: not a directory" if src.exists() else f"{src}: no such directory")
    own = own_dirs(repo, meta)
    for above in (src, *Path(os.path.realpath(src)).parents):
        key = _dev_ino(above)
        what = own.get(key) if key is not None else None
        if what is not None:
            raise UsageError(f"{src}: inside {what}; nothing imported")
    with locked(repo.store, "shared") as lock:
        return _import_locked(repo, meta, src, ref, strict, reread, counters_out, on_problem, started, started_ns,
                              own, lock)


def own_dirs(repo: Repository, meta: MetaCache) -> dict[tuple[int, int], str]:
    """The directories an import into ``repo`` writes, by ``(st_dev, st_ino)``: what
    each is, for messages. Those that do not exist (a remote repository) are not."""
    named = [(repo.local_root, f"the repository {repo.url}"), (meta.path, "its metadata cache")]
    out: dict[tuple[int, int], str] = {}
    for path, what in named:
        key = _dev_ino(path) if path is not None else None
        if key is not None:
            out.setdefault(key, what)
    return out


def _dev_ino(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _import_locked(repo: Repository, meta: MetaCache, src: Path, ref: str, strict: bool, reread: bool,
                   counters_out: list[Counters] | None, on_problem: Callable[[str], None] | None,
                   started: float, started_ns: int, own: dict[tuple[int, int], str],
                   lock: HeldLock) -> ImportResult:
    try:
        prev = None if reread else repo.snapshot(ref)
    except CafsError:
        prev = None
    reader = NodeReader(repo, meta)
    uploader = Uploader(repo.pack_store)
    importer = Importer(repo, meta, lambda: repo.load_index(on_problem=on_problem), uploader, reader, prev, own)
    try:
        if counters_out is not None:
            counters_out.append(importer.counters)
        try:
            root = importer.import_tree(src)
        finally:
            importer.close()
        uploader.drain()
        if strict and importer.skipped:
            raise ImportAborted(
                f"--strict: {len(importer.skipped)} path(s) could not be imported; nothing committed:\n  "
                + "\n  ".join(s.describe() for s in importer.skipped[:50]))
        lock.check()  # a gc that took the lock for stale may have removed the new packs
        repo.write_index(uploader.written)
        c = importer.counters
        stats = {"files": c.files, "dirs": c.dirs, "symlinks": c.symlinks, "bytes": c.logical, "new_bytes": c.new_bytes,
                 "stored_bytes": uploader.bytes_written, "skipped": len(importer.skipped),
                 "started_ns": started_ns}
        snap = repo.commit(ref, root, source=os.fsencode(str(src.absolute())), stats=stats)
    finally:
        uploader.close()
    return ImportResult(snap, importer.counters, importer.skipped, uploader.bytes_written,
                        len(uploader.written), time.monotonic() - started, importer.left_out)


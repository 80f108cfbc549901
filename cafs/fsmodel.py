"""A model of a mounted snapshot: inodes, attributes, directory listings, reads.

No FUSE here: ``cafs.fuse_adapter`` translates kernel requests into calls on
``SnapshotFS`` and its exceptions into errno, so this model is tested without a kernel.

Inode numbers: the root is 1. The first time a directory is looked into, it is given a
block of consecutive inode numbers, one per entry in name order (``base + index``).
Numbers are therefore stable for the life of the mount, and the table's memory grows
with the number of directories visited, not files; entries themselves are re-read from
the (bounded) decoded-node cache when needed. Hard links share one number, as on the
source: the names of a file with a link count above 1 and the same source inode, content
and attributes get the number of whichever of them was met first (``_linked``, one table
entry per such file met), so ``rsync -H``, ``tar`` and ``du`` through the mount see links.

Extended attributes of the root, besides ``user.cafs.id``: ``user.cafs.snapshot``
(``REF@JID`` of the mounted snapshot), ``user.cafs.stats`` (counters, JSON),
``user.cafs.pid`` (the daemon's), ``user.cafs.source`` (the repository and snapshot as
mounted: a local repository as an absolute path, a URL without user information) and
``user.cafs.cache`` (the host cache directory; its ``<repo id>`` subdirectory holds this
mount's metadata and chunk cache) and, if the mount names mirrors, ``user.cafs.mirrors``
(one per line, local ones as absolute paths). ``cafs prefetch MOUNTPOINT`` reads the last
three.

Content ids (``user.cafs.id``): a directory's is its node id; a file's is the id of its
single chunk (the BLAKE3 of its bytes) or, for a file of several chunks or none, the
BLAKE3 of ``b"cafs-file-v1"`` followed by its chunk ids. A symlink has no extended
attributes: Linux allows ``user.*`` names on regular files and directories only, and
answers ENODATA to any read of one on a symlink without asking the filesystem, so a name
listed there could never be read (``rsync -X`` and ``getfattr -h`` failed on it).

A name longer than ``NAME_MAX`` bytes (``f_namemax``) is ``NameTooLong``, not missing: no
snapshot can hold it (``cafs.format.nodes.MAX_NAME``).

A mount takes no lock on the repository: ``cafs forget`` and ``cafs gc`` may remove the
mounted snapshot's data under it. A chunk or node that no pack holds any more (its pack
is gone and the repository index names no other, see ``cafs.repository``) is
``SnapshotDataGone``, whose message says which snapshot and why, rather than the store's
bare "not found"; what the mount holds in its caches keeps being served.
"""

from __future__ import annotations

import bisect
import json
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from collections.abc import Iterator

import trio

from cafs.errors import CafsError, FormatError, ObjectNotFound, PathNotFound
from cafs.fetch import Fetcher
from cafs.format.journal import Snapshot
from cafs.format.location import Location
from cafs.format.nodes import MAX_NAME, Entry
from cafs.ids import digest
from cafs.metacache import NodeNotLoaded, NodeReader
from cafs.tree import entries_from, entry_at, file_spans, lookup_index

ROOT_INO = 1
BLOCK_SIZE = 1 << 20  # st_blksize: invites large reads from cp, Python's io and friends
DIR_SIZE = 4096
NAME_MAX = MAX_NAME  # f_namemax: longer names cannot be in a snapshot
DOTS = 2  # a listing starts with "." and ".."
SIBLING_SPREAD = 8  # how far apart files may be opened and still be a read in order
READ_SHARE_WEIGHT = 1 / 8  # of each file closed, in the running share of files read
COLD_SHARE = 0.5  # a share of files read above which an open means a read to come
RECENT_READS = 16  # reads of an open file remembered to tell a sequential pass from random reads
AHEAD_CHUNK_MIN = 4096  # what a chunk counts for, at least, in the siblings' readahead
_KIND_BITS = {1: stat.S_IFDIR, 2: stat.S_IFREG, 3: stat.S_IFLNK}


class NotADirectory(PathNotFound):
    """An inode used as a directory is not one."""


class IsADirectory(PathNotFound):
    """A directory was opened as a file."""


class NameTooLong(PathNotFound):
    """A name looked up is longer than ``NAME_MAX`` bytes."""


class SnapshotDataGone(CafsError):
    """A chunk or node of the mounted snapshot is in no pack of the repository any more."""


@dataclass
class Attributes:
    ino: int
    mode: int  # with type bits
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    mtime_ns: int


@dataclass
class _DirBlock:
    entry: Entry
    base: int

    @property
    def size(self) -> int:
        """The inode numbers the block holds: one per entry the directory says it has."""
        return max(self.entry.size, 1)

    def ino(self, index: int, dir_ino: int) -> int:
        """The inode number of entry ``index``; FormatError if the directory holds more
        entries than its size says (not written by cafs): that number would be another
        directory's, and its attributes and bytes would be served for this name."""
        if index >= self.size:
            raise FormatError(f"directory inode {dir_ino}: holds more entries than the {self.entry.size} "
                              "its entry says; not a snapshot cafs wrote")
        return self.base + index


@dataclass
class _DirAhead:
    dir_ino: int
    next_ino: int  # the next sibling to load ahead
    bytes: int  # plain bytes loading ahead of the reader


def _ahead_bytes(spans: tuple[Location, ...]) -> int:
    """What a file's chunks count for in the siblings' readahead (``AHEAD_CHUNK_MIN``)."""
    return sum(max(s.length, AHEAD_CHUNK_MIN) for s in spans)


@dataclass
class _NodeLoad:
    done: trio.Event
    error: Exception | None = None


@dataclass
class OpenFile:
    ino: int
    size: int
    spans: tuple[Location, ...]
    starts: list[int]  # plain offset of each span
    # (offset, offset + size) of its last reads, to tell a sequential pass from random reads
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=RECENT_READS))
    ahead_end: int = 0  # where the readahead started for it so far ends
    read: bool = False  # whether any read of it reached this process


@dataclass
class ReadCounters:
    bytes_read: int = 0
    reads: int = 0
    opens: int = 0


class SnapshotFS:
    def __init__(self, snapshot: Snapshot, reader: NodeReader, fetcher: Fetcher, *,
                 readahead: int = 8 << 20, source: str | None = None,
                 cache_dir: str | None = None, mirrors: tuple[str, ...] = ()) -> None:
        self.snapshot = snapshot
        self.source = source  # what was mounted, for user.cafs.source
        self.mirrors = mirrors  # the mount's mirrors, for user.cafs.mirrors
        self.cache_dir = cache_dir  # the host cache directory, for user.cafs.cache
        self.readahead = readahead
        self.reader = reader
        self.fetcher = fetcher
        self.counters = ReadCounters()
        self._blocks: dict[int, _DirBlock] = {}  # directory inode -> its block
        self._bases: list[int] = []  # block bases, ascending
        self._owners: list[int] = []  # directory inode owning the block at the same index
        self._next_ino = ROOT_INO + 1
        self._files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self._last_open = 0
        self._in_order = False  # whether the last open followed the one before in name order
        self._ahead = _DirAhead(0, 0, 0)
        # Of the files recently closed, the share whose reads reached this process. The
        # kernel keeps the content it read (keep_cache), so once files are opened and not
        # read here it serves them itself, and loading ahead for an open would be waste.
        self._read_share = 1.0
        self._node_loads: dict[bytes, _NodeLoad] = {}  # node id -> the load under way
        self._links: dict[tuple[object, ...], int] = {}  # a hard-linked file -> its inode

    async def load_node(self, loc: Location) -> None:
        """Load node ``loc`` (one a call raised ``NodeNotLoaded`` for) from the store into
        the reader's cache. Requests that need one node at once (a pool of readers
        starting in one directory) share one load: the others wait for it and meet its
        error, if any, rather than each asking the store and each waiting out a deadline."""
        pending = self._node_loads.get(loc.id)
        if pending is not None:
            await pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return
        load = self._node_loads[loc.id] = _NodeLoad(trio.Event())
        try:
            try:
                nodes = await self.fetcher.store_call(f"node {loc.describe()}", self.reader.load, loc)
            except ObjectNotFound as gone:
                raise self._gone(f"node {loc.id.hex()[:12]}", gone) from None
            self.reader.loaded(nodes)
        except Exception as exc:
            load.error = exc
            raise
        finally:
            del self._node_loads[loc.id]
            load.done.set()

    # -- inodes -----------------------------------------------------------------------

    def entry(self, ino: int) -> Entry:
        if ino == ROOT_INO:
            return self.snapshot.root
        parent = self._blocks[self.parent(ino)]
        e = entry_at(self.reader, parent.entry, ino - parent.base)
        if e is None:
            raise PathNotFound(f"inode {ino} is unknown")
        return e

    def _block(self, ino: int) -> _DirBlock:
        block = self._blocks.get(ino)
        if block is None:
            e = self.entry(ino)
            if not e.is_dir:
                raise NotADirectory(f"inode {ino} is not a directory")
            block = _DirBlock(e, self._next_ino)
            self._next_ino += block.size
            self._blocks[ino] = block
            self._bases.append(block.base)
            self._owners.append(ino)
        return block

    def lookup(self, parent: int, name: bytes) -> tuple[int, Entry]:
        block = self._block(parent)
        if len(name) > NAME_MAX:
            raise NameTooLong(f"a name of {len(name)} bytes in inode {parent}")
        found = lookup_index(self.reader, block.entry, name)
        if found is None:
            raise PathNotFound(f"no entry {name!r} in inode {parent}")
        index, e = found
        return self._linked(block.ino(index, parent), e), e

    def _linked(self, ino: int, e: Entry) -> int:
        """The inode number of entry ``e`` at ``ino``: for a hard-linked file, the number
        its first name met got. The key is more than the source inode, which a tree
        spanning filesystems may repeat: files that agree on all of it are alike anyway."""
        if e.nlink < 2 or not e.is_file:
            return ino
        return self._links.setdefault((e.ino, e.size, e.mtime_ns, e.mode, e.uid, e.gid, e.spans, e.ref), ino)

    def listdir(self, ino: int, start: int) -> Iterator[tuple[int, Entry, int]]:
        """``(inode, entry, next offset)`` from offset ``start`` of the listing of ``ino``:
        ``.`` and ``..`` (the directory's and its parent's entries, so renamed), then its
        entries in name order. Offset ``k`` resumes at the listing's ``k``-th item."""
        block = self._block(ino)
        if start < 1:
            yield ino, block.entry._replace(name=b"."), 1
        if start < DOTS:
            parent = self.parent(ino)
            yield parent, self.entry(parent)._replace(name=b".."), DOTS
        first = max(start - DOTS, 0)
        for index, e in enumerate(entries_from(self.reader, block.entry, first), first):
            yield self._linked(block.ino(index, ino), e), e, DOTS + index + 1

    def parent(self, ino: int) -> int:
        """The directory that holds inode ``ino``; the root is its own parent."""
        if ino == ROOT_INO:
            return ROOT_INO
        i = bisect.bisect_right(self._bases, ino) - 1
        if i < 0:
            raise PathNotFound(f"inode {ino} is unknown")
        return self._owners[i]

    def attributes(self, ino: int, e: Entry | None = None) -> Attributes:
        e = e or self.entry(ino)
        size = DIR_SIZE if e.is_dir else e.size
        blocks = e.blocks if e.blocks is not None else (size + 511) // 512
        return Attributes(ino, _KIND_BITS[e.kind] | e.mode, e.nlink, e.uid, e.gid, size, blocks, e.mtime_ns)

    def readlink(self, ino: int) -> bytes:
        e = self.entry(ino)
        if not e.is_symlink or e.target is None:
            raise PathNotFound(f"inode {ino} is not a symlink")
        return e.target

    # -- files --------------------------------------------------------------------------

    def open(self, ino: int) -> int:
        e = self.entry(ino)
        if e.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if not e.is_file:
            raise PathNotFound(f"inode {ino} is not a regular file")
        spans = file_spans(self.reader, e)
        starts, pos = [], 0
        for s in spans:
            starts.append(pos)
            pos += s.length
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = OpenFile(ino, e.size, spans, starts)
        if self._read_share > COLD_SHARE:
            self.fetcher.advise(spans)
            if self.readahead:
                self._siblings_ahead(ino, _ahead_bytes(spans))
        self.counters.opens += 1
        return fh

    def _siblings_ahead(self, ino: int, size: int) -> None:
        """Files opened in name order, a few apart at most (several readers), are a
        directory read in order: since the importer packs a directory's files in name
        order, that is a sequential pass over packs, so keep the next siblings' chunks
        loading, up to ``readahead`` bytes ahead, topped up in steps of at least half of
        that. It takes two such opens in a row: one alone is as likely a chance neighbour
        in a shuffled order. A hint: nodes not loaded yet stop it. Each chunk counts as at
        least ``AHEAD_CHUNK_MIN`` bytes (``_ahead_bytes``), so that the chunks of tiny
        files loading ahead fit in the fetcher's in-memory LRU (``MEMORY_CHUNKS``) until
        they are read: counted by their bytes alone, 8 MiB ahead was a whole directory
        of files of a few bytes, and its chunks left the LRU before they were read."""
        last, self._last_open = self._last_open, ino
        owner = self.parent(ino)
        parent = self._blocks[owner]
        in_order = 0 < ino - last <= SIBLING_SPREAD and parent.base <= last
        self._in_order, was_in_order = in_order, self._in_order
        if not (in_order and was_in_order):
            return
        ahead = self._ahead
        if ahead.dir_ino != owner or ahead.next_ino <= ino:
            ahead = _DirAhead(owner, ino + 1, 0)
        else:
            ahead.bytes -= size
            if ahead.bytes >= self.readahead // 2:
                return
        locs: list[Location] = []
        try:
            while ahead.bytes < self.readahead:
                e = entry_at(self.reader, parent.entry, ahead.next_ino - parent.base)
                if e is None:
                    break
                if e.is_file:
                    spans = file_spans(self.reader, e)
                    locs.extend(spans)
                    ahead.bytes += _ahead_bytes(spans)
                ahead.next_ino += 1
        except NodeNotLoaded:
            pass
        self._ahead = ahead
        self.fetcher.prefetch(locs)

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None and f.size:
            self._read_share += READ_SHARE_WEIGHT * (f.read - self._read_share)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """Bytes ``[offset, offset+size)`` of the open file, short at its end. A read that
        continues a sequential pass (it starts at the file's start, or where one of its
        last ``RECENT_READS`` reads ended; see below) keeps chunks loading in the
        background up to ``readahead`` bytes ahead, topped up in steps of at least half
        of that. Other reads (random access: records found through an index) load their
        own chunks alone."""
        f = self._files[fh]
        end = min(offset + size, f.size)
        if offset >= end:
            return b""
        first = i = bisect.bisect_right(f.starts, offset) - 1
        # The kernel's own readahead sends several requests at once, and they may arrive
        # out of order: a read that ends where a recent one started continues the pass
        # too, and so does a file's first read within ``readahead`` of its start. Nearness
        # is not enough otherwise: a random reader's reads are often within the readahead
        # of each other, and each would load a window it never reads.
        sequential = (offset == 0 or (not f.recent and offset < self.readahead)
                      or any(offset == e or offset + size == s for s, e in f.recent))
        f.recent.append((offset, offset + size))
        last = bisect.bisect_left(f.starts, end)
        if sequential and self.readahead:
            if not end + self.readahead // 2 <= f.ahead_end <= end + self.readahead:
                # under half the readahead left: start the rest of the window at once,
                # so that the store sees requests of several MiB, not one per chunk. A
                # window further ahead than that was left by a pass elsewhere in the file
                # (a reader that jumped back): this pass starts its own
                f.ahead_end = end + self.readahead
            last = bisect.bisect_left(f.starts, f.ahead_end)
        if last - first > 1:  # several chunks: load them as runs, not one by one
            self.fetcher.prefetch(f.spans[first:last])
        pieces = []
        pos = offset
        while pos < end:
            span, start = f.spans[i], f.starts[i]
            try:
                data = await self.fetcher.chunk(span)
            except ObjectNotFound as gone:
                raise self._gone(f"inode {f.ino}, offset {start}", gone) from None
            pieces.append(memoryview(data)[pos - start:min(end, start + span.length) - start])
            pos = start + span.length
            i += 1
        f.read = True
        out = pieces[0] if i - first == 1 else b"".join(pieces)
        self.counters.reads += 1
        self.counters.bytes_read += len(out)
        return out

    def _gone(self, what: str, exc: ObjectNotFound) -> SnapshotDataGone:
        return SnapshotDataGone(f"{what} of {self.snapshot.ref}@{self.snapshot.jid} is no longer in the repository ({exc}): the snapshot was "
                                "probably forgotten and collected by cafs gc while mounted; mount one the "
                                "repository keeps (else cafs fsck the repository)")

    # -- extended attributes -------------------------------------------------------------

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        e = self.entry(ino)
        if e.is_symlink:
            return {}  # see the module docstring: the kernel lets no one read it
        out = {b"user.cafs.id": self.content_id(e).hex().encode()}
        if ino == ROOT_INO:
            out[b"user.cafs.snapshot"] = f"{self.snapshot.ref}@{self.snapshot.jid}".encode()
            out[b"user.cafs.stats"] = json.dumps(self.stats()).encode()
            out[b"user.cafs.pid"] = str(os.getpid()).encode()
            if self.source is not None:
                out[b"user.cafs.source"] = os.fsencode(self.source)
            if self.cache_dir is not None:
                out[b"user.cafs.cache"] = os.fsencode(self.cache_dir)
            if self.mirrors:
                out[b"user.cafs.mirrors"] = os.fsencode("\n".join(self.mirrors))
        return out

    def content_id(self, e: Entry) -> bytes:
        if e.is_dir:
            assert e.ref is not None
            return e.ref.id
        if e.is_symlink:
            assert e.target is not None
            return digest(e.target)
        spans = file_spans(self.reader, e)
        if len(spans) == 1:
            return spans[0].id
        return digest(b"cafs-file-v1" + b"".join(s.id for s in spans))

    def stats(self) -> dict[str, int]:
        f = self.fetcher.counters
        out = {"bytes_read": self.counters.bytes_read, "reads": self.counters.reads,
               "opens": self.counters.opens, "bytes_fetched": f.bytes_fetched,
               "cache_hits": f.hits + f.memory_hits, "memory_hits": f.memory_hits, "cache_misses": f.misses, "errors": f.errors,
               "in_flight": f.in_flight, "cache_full": f.cache_full, "damaged_extents": f.damaged,
               "inline_loads": f.inline, "cache_writes_pending": self.fetcher.pending_writes}
        cache = self.fetcher.cache
        if cache is not None:
            out.update(evictions=cache.counters.evictions, cache_size=cache.size_or_unknown(), cache_limit=cache.limit)
        return out

    def statfs_totals(self) -> tuple[int, int]:
        """(logical bytes, number of entries) of the snapshot, from its journal stats."""
        s = self.snapshot.stats
        return s.get("bytes", 0), s.get("files", 0) + s.get("dirs", 0) + s.get("symlinks", 0)


__all__ = ["SnapshotFS", "Attributes", "ROOT_INO", "field"]

"""Read-only questions about snapshots: differences between two, and space accounting.

Pure functions over a ``NodeReader``; the command edge formats what they return.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator

from cafs.format.nodes import Entry
from cafs.metacache import NodeReader
from cafs.repository import Repository
from cafs.tree import depth_first, file_spans, list_dir, walk


def _content_key(reader: NodeReader, e: Entry) -> object:
    if e.is_file:
        return tuple(s.id for s in file_spans(reader, e))
    if e.is_symlink:
        return e.target
    return None


_Pair = tuple[bytes, Entry | None, Entry | None]  # a name, and its entry in each of two directories


def diff_trees(reader: NodeReader, a: Entry, b: Entry, prefix: bytes = b"") -> Iterator[tuple[str, bytes]]:
    """``(mark, path)`` for every difference: ``+`` added, ``-`` removed, ``M`` changed
    (content, type, mode, owner, or a file's or symlink's mtime), in path order.
    Subtrees whose node ids are equal are skipped without being read. Iterative: a
    tree may be deeper than Python's recursion limit. Holds one path, that of the
    directories compared (``cafs.tree.depth_first``)."""

    def below(pair: _Pair, path: bytes) -> Iterator[_Pair] | None:
        _name, ea, eb = pair
        if ea is None or eb is None or not (ea.is_dir and eb.is_dir):
            return None
        return _dir_pairs(reader, ea, eb)

    for sub, (_name, ea, eb) in depth_first(_dir_pairs(reader, a, b), prefix, lambda pair: pair[0], below):
        if eb is None:
            assert ea is not None
            yield from (("-", p) for p, _ in walk(reader, ea, sub))
        elif ea is None:
            yield from (("+", p) for p, _ in walk(reader, eb, sub))
        elif ea.kind != eb.kind:
            yield from (("-", p) for p, _ in walk(reader, ea, sub))
            yield from (("+", p) for p, _ in walk(reader, eb, sub))
        elif ea.is_dir:
            if (ea.mode, ea.uid, ea.gid) != (eb.mode, eb.uid, eb.gid):
                yield "M", sub
        elif ((ea.mode, ea.uid, ea.gid, ea.mtime_ns, ea.size) != (eb.mode, eb.uid, eb.gid, eb.mtime_ns, eb.size)
              or _content_key(reader, ea) != _content_key(reader, eb)):
            yield "M", sub


def _dir_pairs(reader: NodeReader, a: Entry, b: Entry) -> Iterator[_Pair]:
    """``(name, entry in a, entry in b)`` for every name in either directory, in name
    order; nothing if their nodes are the same."""
    if a.ref is not None and b.ref is not None and a.ref.id == b.ref.id:
        return iter(())
    return _merged(list_dir(reader, a), list_dir(reader, b))


def _merged(old: Iterator[Entry], new: Iterator[Entry]) -> Iterator[_Pair]:
    """Two listings in name order merged as they are read, a page at a time: a dict of
    each, sorted, held both directories whole besides the bounded decoded nodes (some
    1.7 KB an entry: 550 MB to compare two versions of one directory of 320,000 files)."""
    ea, eb = next(old, None), next(new, None)
    while ea is not None or eb is not None:
        if eb is None or (ea is not None and ea.name < eb.name):
            assert ea is not None
            yield ea.name, ea, None
            ea = next(old, None)
        elif ea is None or eb.name < ea.name:
            yield eb.name, None, eb
            eb = next(new, None)
        else:
            yield ea.name, ea, eb
            ea, eb = next(old, None), next(new, None)


@dataclass
class SpaceStats:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    logical_bytes: int = 0  # sum of file sizes, each name counted
    unique_bytes: int = 0  # plain bytes of distinct chunks
    stored_bytes: int = 0  # stored bytes of distinct chunks (after compression)
    chunks: int = 0
    packs: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0


def snapshot_space(reader: NodeReader, root: Entry) -> SpaceStats:
    s = SpaceStats()
    seen: set[bytes] = set()
    packs: set[bytes] = set()
    for _path, e in walk(reader, root):
        if e.is_dir:
            s.dirs += 1
        elif e.is_symlink:
            s.symlinks += 1
        else:
            s.files += 1
            s.logical_bytes += e.size
            for span in file_spans(reader, e):
                if span.id not in seen:
                    seen.add(span.id)
                    packs.add(span.pack)
                    s.unique_bytes += span.length
                    s.stored_bytes += span.stored_length
    s.chunks = len(seen)
    s.packs = len(packs)
    return s


@dataclass
class RepoSpace:
    snapshots: int
    logical_bytes: int  # sum over snapshots of their logical bytes
    data_chunks: int
    unique_bytes: int
    stored_bytes: int  # bytes of all packs, data and metadata
    packs: int
    damaged: list[str]  # journal entries that do not decode (left out of the sums)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0


def repo_space(repo: Repository) -> RepoSpace:
    index = repo.load_index()
    snaps, damaged = repo.readable_snapshots()
    chunks = {loc.id: loc for p in index.packs.values() if p.kind == 0 for loc in p.entries}
    return RepoSpace(
        snapshots=len(snaps),
        logical_bytes=sum(s.stats.get("bytes", 0) for s in snaps),
        data_chunks=len(chunks),
        unique_bytes=sum(loc.length for loc in chunks.values()),
        stored_bytes=sum(p.length for p in index.packs.values()),
        packs=len(index.packs),
        damaged=damaged,
    )

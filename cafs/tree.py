"""Reading a snapshot's tree: listing directories, looking up paths, a file's spans.

Pure navigation over nodes obtained from a ``NodeReader``; no I/O of its own. Paths
inside a snapshot are bytes, ``/``-separated, relative to the root (``b""`` is the root).
A path ending in ``/`` names a directory, as in POSIX: ``resolve`` raises ``PathNotFound``
for a regular file there (``ls f/`` is "Not a directory"). A symlink inside a snapshot is
never followed (its target may lie outside it): ``link/`` is the symlink, as ``link`` is.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TypeVar

from cafs.errors import FormatError, PathNotFound
from cafs.format.location import Location
from cafs.format.nodes import DirIndexNode, Entry, FileNode, Node, TreeNode
from cafs.metacache import NodeReader

T = TypeVar("T")


def show_path(path: bytes) -> str:
    """A path for display, one line, unambiguous: UTF-8 where it decodes; a backslash,
    other bytes (``\\xff``) and control characters (``\\n``) escaped."""
    text = path.decode("utf-8", "surrogateescape")
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out) or "."


def list_dir(reader: NodeReader, d: Entry) -> Iterator[Entry]:
    """The entries of directory ``d`` in name order."""
    assert d.ref is not None
    node = reader.node(d.ref)
    if isinstance(node, TreeNode):
        yield from node.entries
    elif isinstance(node, DirIndexNode):
        for page in node.pages:
            yield from _page(reader, page.ref, d).entries
    else:
        raise FormatError(f"directory {d.name!r}: node {d.ref.id.hex()[:12]} is not a directory node")


def _page(reader: NodeReader, loc: Location, d: Entry) -> TreeNode:
    node = reader.node(loc)
    if not isinstance(node, TreeNode):
        raise FormatError(f"directory {d.name!r}: page {loc.id.hex()[:12]} is not a tree node")
    return node


def lookup(reader: NodeReader, d: Entry, name: bytes) -> Entry | None:
    """The entry called ``name`` in directory ``d``, reading at most one page."""
    found = lookup_index(reader, d, name)
    return found[1] if found else None


def resolve(reader: NodeReader, root: Entry, path: bytes) -> Entry:
    entry = root
    for part in (p for p in path.split(b"/") if p):
        if not entry.is_dir:
            raise PathNotFound(f"{show_path(path)}: '{show_path(part)}' is under a non-directory")
        found = lookup(reader, entry, part)
        if found is None:
            raise PathNotFound(f"{show_path(path)}: no such file or directory in the snapshot")
        entry = found
    if path.endswith(b"/") and not (entry.is_dir or entry.is_symlink):
        raise PathNotFound(f"{show_path(path)}: not a directory")
    return entry


def file_spans(reader: NodeReader, f: Entry) -> tuple[Location, ...]:
    if f.spans is not None:
        return f.spans
    assert f.ref is not None
    node = reader.node(f.ref)
    if not isinstance(node, FileNode):
        raise FormatError(f"file {f.name!r}: node {f.ref.id.hex()[:12]} is not a file node")
    if sum(s.length for s in node.spans) != f.size:
        raise FormatError(f"file {f.name!r}: spans add up to {sum(s.length for s in node.spans)}, size is {f.size}")
    return node.spans


def walk(reader: NodeReader, top: Entry, prefix: bytes = b"") -> Iterator[tuple[bytes, Entry]]:
    """``(path, entry)`` for ``top`` and everything below it, parents before children,
    in name order (paths held as ``depth_first`` holds them); ``prefix`` is the path of
    ``top``, a trailing slash dropped."""
    prefix = prefix.rstrip(b"/")
    yield prefix, top
    if top.is_dir:
        yield from depth_first(
            list_dir(reader, top), prefix, lambda e: e.name,
            lambda e, _path: list_dir(reader, e) if e.is_dir else None)


def depth_first(top: Iterator[T], prefix: bytes, name_of: Callable[[T], bytes],
                children_of: Callable[[T, bytes], Iterator[T] | None]) -> Iterator[tuple[bytes, T]]:
    """``(path, item)`` for each item of ``top`` (the items of the directory at
    ``prefix``) and, depth first, below it: after an item is yielded, ``children_of(item,
    its path)`` gives the items of the directory it is, or None if it is none. Holds one
    path, that of the directory being listed (and at each level above it the items left):
    a path for each item left, kept until walked, took memory growing with the square of
    the depth (a GB for a tree 2,000 deep with names of 255 bytes and a file beside each
    directory)."""
    path = prefix
    levels = [top]
    names: list[bytes] = []  # of the directories entered below ``prefix``
    while levels:
        item = next(levels[-1], None)
        if item is None:
            levels.pop()
            if names:  # back in the directory above
                name = names.pop()
                path = path[:len(path) - len(name) - 1] if len(path) > len(name) else b""
            continue
        name = name_of(item)
        item_path = path + b"/" + name if path else name
        yield item_path, item
        children = children_of(item, item_path)
        if children is not None:
            levels.append(children)
            names.append(name)
            path = item_path


def reachable(node_of: Callable[[Location], Node], root: Location, walked: set[bytes]) -> Iterator[Location]:
    """Every reference in the DAG below the node at ``root``, ``root`` included: each
    node location and each file span, as the parent holding it says (a location whose
    pack gc has since repacked is yielded as it is; see ``Repository.relocated``).

    Each node is read (through ``node_of``) and descended into once: node ids are added
    to ``walked``, and a node already in it is yielded but not read again, so passing
    one set for several snapshots walks what they share once. An id may therefore be
    yielded more than once, with the same or another location. Used by gc (what is
    live) and copy (which packs a snapshot needs); raises whatever ``node_of`` raises.
    """
    stack = [root]
    while stack:
        loc = stack.pop()
        yield loc
        if loc.id in walked:
            continue
        walked.add(loc.id)
        node = node_of(loc)
        if isinstance(node, TreeNode):
            for e in node.entries:
                if e.ref is not None:
                    stack.append(e.ref)
                if e.spans:
                    yield from e.spans
        elif isinstance(node, DirIndexNode):
            stack.extend(p.ref for p in node.pages)
        elif isinstance(node, FileNode):
            yield from node.spans


def entry_at(reader: NodeReader, d: Entry, index: int) -> Entry | None:
    """The ``index``-th entry (in name order) of directory ``d``, reading one page."""
    return next(entries_from(reader, d, index), None)


def entries_from(reader: NodeReader, d: Entry, index: int) -> Iterator[Entry]:
    """The entries of directory ``d`` from the ``index``-th on, in name order, reading a
    page at a time as the caller goes on. Indexes follow the pages' counts (what
    ``lookup_index`` gives): a page holding fewer entries than its count ends the listing."""
    assert d.ref is not None
    if index < 0:
        return
    node = reader.node(d.ref)
    if isinstance(node, TreeNode):
        yield from node.entries[index:]
        return
    if not isinstance(node, DirIndexNode):
        raise FormatError(f"directory {d.name!r}: node {d.ref.id.hex()[:12]} is not a directory node")
    first = max(bisect.bisect_right(node.starts, index) - 1, 0)
    for page, start in zip(node.pages[first:], node.starts[first:], strict=True):
        entries, count = _page(reader, page.ref, d).entries, page.count
        yield from entries[max(index - start, 0):count]
        if len(entries) < count:
            return


def lookup_index(reader: NodeReader, d: Entry, name: bytes) -> tuple[int, Entry] | None:
    """``(index, entry)`` of ``name`` in directory ``d``, reading at most one page."""
    assert d.ref is not None
    node = reader.node(d.ref)
    start, count = 0, None
    if isinstance(node, DirIndexNode):
        i = bisect.bisect_right(node.firsts, name) - 1
        if i < 0:
            return None
        start, count = node.starts[i], node.pages[i].count
        node = _page(reader, node.pages[i].ref, d)
    if not isinstance(node, TreeNode):
        raise FormatError(f"directory {d.name!r}: node {d.ref.id.hex()[:12]} is not a directory node")
    names = node.names
    i = bisect.bisect_left(names, name)
    if i < len(names) and names[i] == name:
        if count is not None and i >= count:  # its index would be the next page's entry's
            raise FormatError(f"directory {d.name!r}: a page holds more entries than the {count} its index says")
        return start + i, node.entries[i]
    return None

"""Metadata nodes: directories (or pages of one), large files' span lists, and entries.

A node is one msgpack array ``[tag, payload]``; its id is the BLAKE3-256 of those bytes.
Nodes are stored like chunks (in metadata packs, raw or zstd) and referenced by a
``Location``, so the nodes form a Merkle DAG whose root is a snapshot.

``TAG_TREE`` (1): payload is a list of entries sorted by name (bytewise, strictly
ascending, so names are unique). A directory of at most ``PAGE_ENTRIES`` entries is one
tree node.

``TAG_DIR_INDEX`` (2): a larger directory: payload is a list of pages
``[first_name, count, location]`` in name order; each page is a tree node of at most
``PAGE_ENTRIES`` entries, so a lookup reads the index and one page.

``TAG_FILE`` (3): payload is the list of a file's spans (locations), used when a file has
more than ``INLINE_SPANS`` chunks; smaller files keep their spans inline in the entry.

An entry is ``[name, kind, mode, uid, gid, mtime_ns, size, nlink, ino, content, blocks]``
(format version 3; repositories of versions 1 and 2 hold entries of the first ten fields,
and every reader takes both):

- ``name``: 1-255 bytes, no ``/`` or NUL, not ``.`` or ``..`` (the root's name is empty);
- ``kind``: 1 directory, 2 regular file, 3 symlink;
- ``mode``: permission bits (``st_mode & 0o7777``); ``uid``, ``gid``: numeric owners;
- ``mtime_ns``: modification time in nanoseconds since the epoch (may be negative);
- ``size``: a file's length in bytes, a symlink's target length, a directory's entry count;
- ``nlink``: the number of names of the inode inside the imported tree (directories:
  2 + subdirectories);
- ``ino``: the inode number the entry had on the importing host (used only to skip
  unchanged files on the next import of the same ref);
- ``content``: directory: the location of its node; file: ``[0, [spans]]`` inline or
  ``[1, location]`` of a file node; symlink: the target bytes (1-4096, no NUL, verbatim);
- ``blocks``: ``st_blocks`` on the source (512-byte units allocated), which a mount
  reports as it was, so ``du`` and a sparse file's allocation read the same through it.
  An entry without it is reported as ``ceil(size / 512)`` blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, NamedTuple, Union

from cafs.format.location import Location, decode_location
from cafs.format.strict import expect_bytes, expect_int, expect_list, fail, pack, unpack

TAG_TREE = 1
TAG_DIR_INDEX = 2
TAG_FILE = 3

KIND_DIR = 1
KIND_FILE = 2
KIND_SYMLINK = 3
KINDS = (KIND_DIR, KIND_FILE, KIND_SYMLINK)

PAGE_ENTRIES = 1024
MAX_PAGES = 1 << 16
INLINE_SPANS = 16
MAX_SPANS = 1 << 20
MAX_NAME = 255
MAX_TARGET = 4096
INT64 = (-(1 << 63), (1 << 63) - 1)

CONTENT_INLINE = 0
CONTENT_NODE = 1


def check_name(name: bytes, what: str = "name") -> bytes:
    """Return ``name`` if it is a valid single path component, else raise FormatError."""
    if not 1 <= len(name) <= MAX_NAME or b"/" in name or b"\0" in name or name in (b".", b".."):
        fail(what, f"invalid file name {name[:300]!r}")
    return name


class Entry(NamedTuple):
    # A NamedTuple, not a frozen dataclass: built several times faster, which is most of
    # decoding a directory node (an unchanged re-import decodes every one it walks).
    name: bytes
    kind: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    nlink: int
    ino: int
    spans: tuple[Location, ...] | None = None  # a file's spans, when inline
    ref: Location | None = None  # a directory's node, or a large file's file node
    target: bytes | None = None  # a symlink's target
    blocks: int | None = None  # st_blocks on the source; None in entries of format 1-2

    @property
    def is_dir(self) -> bool:
        return self.kind == KIND_DIR

    @property
    def is_file(self) -> bool:
        return self.kind == KIND_FILE

    @property
    def is_symlink(self) -> bool:
        return self.kind == KIND_SYMLINK

    def encode(self) -> list[Any]:
        if self.kind == KIND_DIR:
            assert self.ref is not None
            content: Any = self.ref.encode()
        elif self.kind == KIND_FILE:
            if self.spans is not None:
                content = [CONTENT_INLINE, [s.encode() for s in self.spans]]
            else:
                assert self.ref is not None
                content = [CONTENT_NODE, self.ref.encode()]
        else:
            content = self.target
        fields = [self.name, self.kind, self.mode, self.uid, self.gid, self.mtime_ns,
                  self.size, self.nlink, self.ino, content]
        if self.blocks is not None:
            fields.append(self.blocks)
        return fields


_U32 = 1 << 32
_U64 = 1 << 64


def decode_entry(value: Any, what: str, *, root: bool = False) -> Entry:
    # Fast path for valid file and directory entries: the same checks as
    # _decode_entry_checked, without building a message per field. Anything it does not
    # accept goes through the checked path, which names what is wrong.
    n = len(value) if not root and type(value) is list else 0
    blocks = None
    if n == ENTRY_FIELDS:
        name, kind, mode, uid, gid, mtime, size, nlink, ino, content, blocks = value
    elif n == OLD_ENTRY_FIELDS:
        name, kind, mode, uid, gid, mtime, size, nlink, ino, content = value
    if n == OLD_ENTRY_FIELDS or n == ENTRY_FIELDS and type(blocks) is int and 0 <= blocks <= INT64[1]:
        if (type(name) is bytes and 0 < len(name) <= MAX_NAME and b"/" not in name and b"\0" not in name
                and name != b"." and name != b".." and type(kind) is int
                and type(mode) is int and 0 <= mode <= 0o7777 and type(uid) is int and 0 <= uid < _U32
                and type(gid) is int and 0 <= gid < _U32 and type(mtime) is int and INT64[0] <= mtime <= INT64[1]
                and type(size) is int and 0 <= size <= INT64[1] and type(nlink) is int and 1 <= nlink < _U32
                and type(ino) is int and 0 <= ino < _U64):
            if (kind == KIND_FILE and type(content) is list and len(content) == 2
                    and type(content[0]) is int and content[0] == CONTENT_INLINE
                    and type(content[1]) is list and len(content[1]) <= INLINE_SPANS):
                items = content[1]
                if len(items) == 1:  # most files are one chunk
                    span = decode_location(items[0], what)
                    if span.length == size:
                        return Entry(name, KIND_FILE, mode, uid, gid, mtime, size, nlink, ino, (span,), blocks=blocks)
                else:
                    spans = tuple([decode_location(s, what) for s in items])
                    if sum([s.length for s in spans]) == size:
                        return Entry(name, KIND_FILE, mode, uid, gid, mtime, size, nlink, ino, spans, blocks=blocks)
            elif kind == KIND_DIR:
                return Entry(name, KIND_DIR, mode, uid, gid, mtime, size, nlink, ino, None,
                             decode_location(content, what), blocks=blocks)
    return _decode_entry_checked(value, what, root=root)


def _decode_entry_checked(value: Any, what: str, *, root: bool = False) -> Entry:
    f = expect_list(value, what)
    if len(f) not in _ENTRY_LENGTHS:
        fail(what, f"an entry has {OLD_ENTRY_FIELDS} or {ENTRY_FIELDS} fields, not {len(f)}")
    name = expect_bytes(f[0], what + " name", max_len=MAX_NAME)
    if root:
        if name:
            fail(what, "the root entry must have an empty name")
    else:
        check_name(name, what)
    where = f"{what} {name[:80]!r}"
    kind = expect_int(f[1], where + " kind", lo=KIND_DIR, hi=KIND_DIR if root else KIND_SYMLINK)
    mode = expect_int(f[2], where + " mode", hi=0o7777)
    uid = expect_int(f[3], where + " uid", hi=(1 << 32) - 1)
    gid = expect_int(f[4], where + " gid", hi=(1 << 32) - 1)
    mtime = expect_int(f[5], where + " mtime", lo=INT64[0], hi=INT64[1])
    size = expect_int(f[6], where + " size")
    nlink = expect_int(f[7], where + " nlink", lo=1, hi=(1 << 32) - 1)
    ino = expect_int(f[8], where + " ino", hi=(1 << 64) - 1)
    content = f[9]
    blocks = expect_int(f[F_BLOCKS], where + " blocks") if len(f) == ENTRY_FIELDS else None
    spans = ref = target = None
    if kind == KIND_DIR:
        ref = decode_location(content, where + " node")
    elif kind == KIND_FILE:
        c = expect_list(content, where + " content", length=2)
        how = expect_int(c[0], where + " content kind", hi=CONTENT_NODE)
        if how == CONTENT_INLINE:
            items = expect_list(c[1], where + " spans", max_len=INLINE_SPANS)
            spans = tuple(decode_location(s, where + " span") for s in items)
            if sum(s.length for s in spans) != size:
                fail(where, f"spans add up to {sum(s.length for s in spans)} bytes, size says {size}")
        else:
            ref = decode_location(c[1], where + " file node")
    else:
        target = expect_bytes(content, where + " target", min_len=1, max_len=MAX_TARGET)
        if b"\0" in target:
            fail(where, "symlink target contains NUL")
        if size != len(target):
            fail(where, f"symlink size {size} != target length {len(target)}")
    return Entry(name, kind, mode, uid, gid, mtime, size, nlink, ino, spans, ref, target, blocks)


@dataclass(frozen=True, slots=True)
class TreeNode:
    entries: tuple[Entry, ...]
    names: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # kept beside the entries so a lookup bisects without building a list
        object.__setattr__(self, "names", tuple(e.name for e in self.entries))


@dataclass(frozen=True, slots=True)
class PageRef:
    first_name: bytes
    count: int
    ref: Location


@dataclass(frozen=True, slots=True)
class DirIndexNode:
    pages: tuple[PageRef, ...]
    # Kept beside the pages so that finding the page of a name or of an index bisects:
    # a pass over the pages for each entry made listing a directory of n entries cost
    # n * n / 2048 steps (minutes for a million).
    firsts: tuple[bytes, ...] = field(init=False, repr=False, compare=False)  # each page's first name
    starts: tuple[int, ...] = field(init=False, repr=False, compare=False)  # the index of its first entry

    def __post_init__(self) -> None:
        object.__setattr__(self, "firsts", tuple(p.first_name for p in self.pages))
        object.__setattr__(self, "starts", tuple(accumulate((p.count for p in self.pages[:-1]), initial=0)))

    @property
    def count(self) -> int:
        return self.starts[-1] + self.pages[-1].count if self.pages else 0


@dataclass(frozen=True, slots=True)
class FileNode:
    spans: tuple[Location, ...]


Node = Union[TreeNode, DirIndexNode, FileNode]


def encode_tree(entries: Sequence[Entry | list[Any]]) -> bytes:
    """A tree node's bytes. An entry may be given as ``entry_fields`` gave it (a list of
    its fields): it is written back as it was read, so a directory with a few changed
    entries is encoded without decoding the unchanged ones."""
    return pack([TAG_TREE, [e if isinstance(e, list) else e.encode() for e in entries]])


def encode_node(node: Node) -> bytes:
    if isinstance(node, TreeNode):
        return encode_tree(node.entries)
    if isinstance(node, DirIndexNode):
        payload = [[p.first_name, p.count, p.ref.encode()] for p in node.pages]
        return pack([TAG_DIR_INDEX, payload])
    return pack([TAG_FILE, [s.encode() for s in node.spans]])


# Where each field sits in an entry's list, for code that reads entries as
# ``entry_fields`` gives them, undecoded.
F_NAME, F_KIND, F_MODE, F_UID, F_GID, F_MTIME, F_SIZE, F_NLINK, F_INO, F_CONTENT, F_BLOCKS = range(11)
ENTRY_FIELDS = 11
OLD_ENTRY_FIELDS = 10  # format versions 1 and 2: no blocks
_ENTRY_LENGTHS = (OLD_ENTRY_FIELDS, ENTRY_FIELDS)


def entry_fields(data: bytes | memoryview, what: str = "node") -> list[list[Any]] | None:
    """The entries of a tree node as msgpack decodes them, checked only for their shape
    (each a list of ten or eleven fields whose name is bytes), or None if the node is not a tree
    node. For comparing many entries with what is on disk at a fraction of the cost of
    ``decode_node``; an entry used for anything more goes through ``decode_entry``."""
    top = unpack(data, what)
    if type(top) is not list or len(top) != 2 or top[0] != TAG_TREE or type(top[0]) is not int:
        return None
    items = expect_list(top[1], what + " entries", max_len=PAGE_ENTRIES)
    for e in items:
        if type(e) is not list or not OLD_ENTRY_FIELDS <= len(e) <= ENTRY_FIELDS or type(e[F_NAME]) is not bytes:
            fail(what, "an entry is not a list of ten or eleven fields with a bytes name")
    return items


def decode_node(data: bytes | memoryview, what: str = "node") -> Node:
    top = expect_list(unpack(data, what), what, length=2)
    tag = expect_int(top[0], what + " tag", lo=TAG_TREE, hi=TAG_FILE)
    if tag == TAG_TREE:
        items = expect_list(top[1], what + " entries", max_len=PAGE_ENTRIES)
        entries = tuple(decode_entry(e, what + " entry") for e in items)
        for a, b in zip(entries, entries[1:], strict=False):
            if not a.name < b.name:
                fail(what, f"entries not in strictly ascending name order at {b.name[:80]!r}")
        return TreeNode(entries)
    if tag == TAG_DIR_INDEX:
        items = expect_list(top[1], what + " pages", max_len=MAX_PAGES)
        pages: list[PageRef] = []
        for p in items:
            f = expect_list(p, what + " page", length=3)
            first = check_name(expect_bytes(f[0], what + " page name", max_len=MAX_NAME), what + " page")
            count = expect_int(f[1], what + " page count", lo=1, hi=PAGE_ENTRIES)
            pages.append(PageRef(first, count, decode_location(f[2], what + " page")))
        if not pages:
            fail(what, "a directory index has no pages")
        for left, right in zip(pages, pages[1:], strict=False):
            if not left.first_name < right.first_name:
                fail(what, "directory pages not in ascending name order")
        return DirIndexNode(tuple(pages))
    items = expect_list(top[1], what + " spans", max_len=MAX_SPANS)
    return FileNode(tuple(decode_location(s, what + " span") for s in items))

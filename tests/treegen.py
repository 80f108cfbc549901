"""Source trees for import/extract tests, and exact comparison of two trees.

Contract:

- ``make_tree(root, seed=...)`` builds, at a new or empty ``root``, a tree that holds
  every case an importer must handle (the layout is listed in its docstring). The same
  seed gives the same tree: names, bytes, modes and every mtime, directories included
  (all mtimes are set explicitly, directories last and bottom-up). It returns ``root``.
- ``manifest(root)`` describes a tree completely enough for "the tree that came back
  equals the source": for every path below ``root``, its kind, permission bits, size,
  mtime in nanoseconds, symlink target and a SHA-256 of its bytes. It never follows a
  symlink. The root directory itself is left out (its name, mode and mtime belong to
  whoever made it) unless ``include_root=True``; a root that is a file or a symlink is the
  one entry ``b""``, so a single extracted file compares like a tree.
- ``diff_manifests`` lists the differences one per line; ``assert_same_tree`` raises
  ``AssertionError`` naming the first 20.
- ``mutate_tree`` changes a tree as a day of work on a dataset would (rewrites, new
  files, a new directory, a few deletions) and returns exactly which paths changed, in
  the terms of ``cafs diff``: directory mtimes are not "changes".

Raises: ``make_tree`` raises ``FileExistsError`` for a ``root`` that is not empty; all
three raise ``OSError`` from the filesystem (an unreadable file in ``manifest``, say).

Not compared, deliberately: owner and group, atime and ctime, xattrs and ACLs, and
whether two names share an inode (cafs extracts a hard-link pair as two files).

Caveats:

- Mtimes in 2100 need a filesystem that stores them (ext4 with 256-byte inodes, tmpfs,
  btrfs, XFS with bigtime); elsewhere the kernel clamps them, so the tree still compares
  equal to its copies but no longer holds that case.
- Whether the sparse files keep their holes depends on the filesystem; only content is
  compared, so an extractor that writes zeros is correct.
- ``manifest`` reads every byte (about 8 MB for the default tree): cheap here, not for
  a real dataset.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple, TypedDict

# mtimes: a counter from here, 1_000_000_007 ns apart, so every entry has its own
# mtime and most have nonzero nanoseconds
BASE_MTIME_NS = 1_600_000_000_123_456_789
MTIME_STEP_NS = 1_000_000_007
EPOCH_PLUS_1S_NS = 1_000_000_000  # 1970-01-01 00:00:01
YEAR_2100_NS = 4_102_444_800_000_000_000  # 2100-01-01 00:00:00 UTC
DEEP_LEVELS = 60
SPARSE_SIZE = (1 << 20) + 4097

# names in odd/ (test_import_get counts them: exactly these nine)
ODD_NAMES: tuple[bytes, ...] = (
    b"with space", b"new\nline", b"tab\there", b"\xff\xfenot-utf8", b"-dash",
    "ünïcødé-名前".encode(), b"x" * 255, b"back\\slash", b"quote'\"",
)
ODD_SYMLINK_TARGET = b"no such\ntarget \xff\xfe \xe2\x98\x83"


class Item(NamedTuple):
    """One path of a manifest. A plain tuple, so manifests compare with ``==``."""

    kind: str  # "d" directory, "f" regular file, "l" symlink, "s" other (fifo, socket, device)
    mode: int  # st_mode & 0o7777
    size: int  # st_size for a file, else 0
    mtime_ns: int | None  # None: a dir under ignore_dir_mtime, a symlink unless symlink_mtimes
    target: bytes | None  # a symlink's target, else None
    digest: str | None  # SHA-256 hex of a file's bytes, else None


Manifest = dict[bytes, Item]


class Mutation(TypedDict):
    """What ``mutate_tree`` did; paths are relative, sorted, and as ``cafs diff`` shows them."""

    modified: list[bytes]  # files rewritten in place: same size and inode, new bytes, new mtime
    added: list[bytes]  # new files, and a new directory and the file inside it
    removed: list[bytes]  # files deleted
    new_bytes: int  # bytes of content that did not exist before (rewritten plus added)


# -- helpers ------------------------------------------------------------------------------


def _join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def _write(path: bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.chmod(path, mode)  # after writing: a 0o444 file must be writable while we fill it


def _dir_listing(path: bytes) -> list[tuple[bytes, bool]]:
    """Sorted (name, is a directory) of one directory, symlinks not followed."""
    with os.scandir(path) as it:
        return sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)


def _walk(root: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """Every path below ``root`` with its lstat, parents before children, in name order."""
    stack = [b""]
    while stack:
        rel = stack.pop()
        children = _dir_listing(_join(root, rel) if rel else root)
        for name, _is_dir in children:
            child = _join(rel, name)
            st = os.lstat(_join(root, child))
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def _set_mtimes(root: bytes, fixed: dict[bytes, int]) -> None:
    """Give every path below and including ``root`` an mtime: ``fixed[rel]`` if given,
    else the next value of a counter. Children first, each directory after everything in
    it, because creating an entry changes its directory's mtime."""
    order: list[tuple[bytes, list[tuple[bytes, bool]]]] = []  # each dir before its descendants
    stack = [b""]
    while stack:
        rel = stack.pop()
        children = _dir_listing(_join(root, rel) if rel else root)
        order.append((rel, children))
        stack.extend(_join(rel, name) for name, is_dir in reversed(children) if is_dir)
    t = BASE_MTIME_NS
    for rel, children in reversed(order):
        for name, is_dir in children:
            if not is_dir:
                t += MTIME_STEP_NS
                child = _join(rel, name)
                ns = fixed.get(child, t)
                os.utime(_join(root, child), ns=(ns, ns), follow_symlinks=False)
        t += MTIME_STEP_NS
        ns = fixed.get(rel, t)
        os.utime(_join(root, rel) if rel else root, ns=(ns, ns), follow_symlinks=False)


# -- make_tree ----------------------------------------------------------------------------


def make_tree(root: Path, *, seed: int = 0, big_file_size: int = 3 * 2**20,
              wide_dir_files: int = 0) -> Path:
    """Create the tree at ``root`` (new, or an empty directory) and return ``root``.

    Layout (every directory 0o755 and every file 0o644 unless said otherwise):

    ``data/``: random files of 0, 1, 100, 4095, 4096, 16 KiB, 64 KiB+7 and 300 KiB
    (``f%07d`` by size); ``big`` (``big_file_size`` random bytes: give the repository a
    small pack size so it spans several packs); ``zeros`` (200 KiB) and ``text.txt``
    (repeated lines, compressible); ``half-dup`` (its second half repeats its first);
    ``copy-of-dups`` (the bytes of ``dups/copy0``); ``sparse`` (1 MiB+4097 with holes,
    data at the end) and ``sparse-tail`` (ends in a hole); ``readonly`` 0o444,
    ``script.sh`` 0o755, ``setgid-ish`` 0o640; ``sub/`` (0o750, twenty small files).
    ``dups/``: ``copy0``..``copy3`` equal, ``hardlink`` the same inode as ``copy0``.
    ``empty/``: an empty directory. ``odd/``: the nine ``ODD_NAMES`` (space, newline,
    tab, non-UTF-8, leading dash, unicode, 255 bytes, backslash, quotes).
    ``dir \\xff\\xfe odd/inside``: a directory whose name is not UTF-8.
    ``.hidden``, ``.hidden-dir/.inner``, ``.hidden-dir/plain``: hidden names.
    ``links/``: ``relative`` (to ``../data/big``), ``to-dir`` (``../data``), ``chain`` (to
    ``relative``), ``dangling``, ``escaping`` (``../../../../outside``), ``absolute``
    (``/etc/hostname-does-not-exist``), ``odd-target`` (``ODD_SYMLINK_TARGET``: newline,
    non-UTF-8 bytes, unicode).
    ``modes/``: ``private`` 0o600, ``exec`` 0o755, ``readonly`` 0o444, ``setgid-dir/``
    0o2755 and ``private-dir/`` 0o700 (each holding ``file``).
    ``mtimes/``: ``epoch-plus-1s`` and ``year-2100`` files, ``old-dir/`` (1970+1s) and
    ``future-dir/`` (2100) directories, each holding ``file``.
    ``deep/d00/.../d59/bottom``: sixty nested directories.
    ``wide/f000001``...: ``wide_dir_files`` tiny files, if asked for.
    """
    rnd = random.Random(seed)
    r = os.fsencode(root)
    try:
        os.mkdir(r)
    except FileExistsError:
        if os.listdir(r):
            raise FileExistsError(errno.ENOTEMPTY, "make_tree needs a new or empty directory",
                                  os.fsdecode(r)) from None
    os.chmod(r, 0o755)

    def p(rel: bytes) -> bytes:
        return r + b"/" + rel

    def mkdir(rel: bytes, mode: int = 0o755) -> None:
        os.mkdir(p(rel))
        os.chmod(p(rel), mode)  # explicit: neither the umask nor a setgid parent decides

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> None:
        _write(p(rel), data, mode)

    for d in (b"data", b"data/sub", b"dups", b"empty", b"odd", b"links", b"modes", b"mtimes",
              b"deep", b".hidden-dir"):
        mkdir(d)
    os.chmod(p(b"data/sub"), 0o750)

    # sizes, compressibility and deduplication
    for size in (0, 1, 100, 4095, 4096, 16 << 10, (64 << 10) + 7, 300 << 10):
        write(b"data/f%07d" % size, rnd.randbytes(size))
    write(b"data/big", rnd.randbytes(big_file_size))
    write(b"data/zeros", bytes(200 << 10))
    write(b"data/text.txt", b"".join(b"line %d of some text\n" % i for i in range(5000)))
    for i in range(20):
        write(b"data/sub/s%02d" % i, rnd.randbytes(rnd.randrange(1, 20_000)))
    half = rnd.randbytes(384 << 10)
    write(b"data/half-dup", half + half)
    dup = rnd.randbytes(200 << 10)
    for i in range(4):
        write(b"dups/copy%d" % i, dup)
    write(b"data/copy-of-dups", dup)
    os.link(p(b"dups/copy0"), p(b"dups/hardlink"))
    _make_sparse(p(b"data/sparse"), rnd, SPARSE_SIZE, [(0, 100), (262_147, 5000), (700_001, 1),
                                                        (SPARSE_SIZE - 10, 10)])
    _make_sparse(p(b"data/sparse-tail"), rnd, 512 << 10, [(0, 100), (100_000, 3000)])
    write(b"data/readonly", b"read only\n", 0o444)
    write(b"data/script.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(b"data/setgid-ish", b"mode bits\n", 0o640)

    # names
    for name in ODD_NAMES:
        write(b"odd/" + name, name * 3)
    mkdir(b"dir \xff\xfe odd")
    write(b"dir \xff\xfe odd/inside", b"inside a directory with a non-UTF-8 name\n")
    write(b".hidden", b"hidden file\n")
    write(b".hidden-dir/.inner", b"hidden in hidden\n")
    write(b".hidden-dir/plain", b"plain in hidden\n")

    # symlinks
    for target, name in ((b"../data/big", b"relative"), (b"../data", b"to-dir"),
                         (b"relative", b"chain"), (b"no/such/target", b"dangling"),
                         (b"../../../../outside", b"escaping"),
                         (b"/etc/hostname-does-not-exist", b"absolute"),
                         (ODD_SYMLINK_TARGET, b"odd-target")):
        os.symlink(target, p(b"links/" + name))

    # modes
    write(b"modes/private", b"private\n", 0o600)
    write(b"modes/exec", b"#!/bin/sh\nexit 0\n", 0o755)
    write(b"modes/readonly", b"read only\n", 0o444)
    mkdir(b"modes/setgid-dir", 0o2755)
    write(b"modes/setgid-dir/file", b"in a setgid directory\n")
    mkdir(b"modes/private-dir", 0o700)
    write(b"modes/private-dir/file", b"in a private directory\n")

    # mtimes at the edges (the rest come from the counter in _set_mtimes)
    fixed = {b"mtimes/epoch-plus-1s": EPOCH_PLUS_1S_NS, b"mtimes/year-2100": YEAR_2100_NS,
             b"mtimes/old-dir": EPOCH_PLUS_1S_NS, b"mtimes/future-dir": YEAR_2100_NS + 999_999_999}
    for rel in (b"mtimes/epoch-plus-1s", b"mtimes/year-2100"):
        write(rel, rel + b"\n")
    for rel in (b"mtimes/old-dir", b"mtimes/future-dir"):
        mkdir(rel)
        write(rel + b"/file", rel + b"\n")

    deep = b"deep"
    for i in range(DEEP_LEVELS):
        deep += b"/d%02d" % i
        mkdir(deep)
    write(deep + b"/bottom", b"at the bottom\n")

    if wide_dir_files > 0:
        mkdir(b"wide")
        _make_wide(p(b"wide"), wide_dir_files)

    _set_mtimes(r, fixed)
    return root


def _make_sparse(path: bytes, rnd: random.Random, size: int, writes: list[tuple[int, int]]) -> None:
    """A file of ``size`` bytes made by truncate, with random data at (offset, length)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, length in writes:
            os.pwrite(fd, rnd.randbytes(length), offset)
    finally:
        os.close(fd)
    os.chmod(path, 0o644)


def _make_wide(path: bytes, n: int) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(1, n + 1):
            fd = os.open(b"f%06d" % i, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            try:
                os.write(fd, b"%d\n" % i)
                os.fchmod(fd, 0o644)  # whatever the umask
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


# -- manifest and comparison ---------------------------------------------------------------


def _digest(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def _item(path: bytes, st: os.stat_result, symlink_mtimes: bool, ignore_dir_mtime: bool) -> Item:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return Item("d", mode, 0, None if ignore_dir_mtime else st.st_mtime_ns, None, None)
    if stat.S_ISREG(st.st_mode):
        return Item("f", mode, st.st_size, st.st_mtime_ns, None, _digest(path))
    if stat.S_ISLNK(st.st_mode):
        mtime = st.st_mtime_ns if symlink_mtimes else None
        return Item("l", mode, 0, mtime, os.readlink(path), None)
    return Item("s", mode, 0, st.st_mtime_ns, None, None)


def all_files(root: Path) -> dict[str, bytes]:
    """Every regular file below ``root`` and its bytes: to check that a command left a
    repository or tree byte for byte as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def manifest(root: Path, *, symlink_mtimes: bool = False, ignore_dir_mtime: bool = False,
             include_root: bool = False) -> Manifest:
    """Every path below ``root`` (``b"a/b"``) and what it is, in name order.

    ``root`` itself is ``b""``: present when ``include_root`` or when ``root`` is not a
    directory. Symlink mtimes are ``None`` unless ``symlink_mtimes`` (not every tool
    restores them); directory mtimes are ``None`` under ``ignore_dir_mtime``."""
    r = os.fsencode(root)
    st = os.lstat(r)
    out: Manifest = {}
    if include_root or not stat.S_ISDIR(st.st_mode):
        out[b""] = _item(r, st, symlink_mtimes, ignore_dir_mtime)
    if stat.S_ISDIR(st.st_mode):
        for rel, child_st in _walk(r):
            out[rel] = _item(_join(r, rel), child_st, symlink_mtimes, ignore_dir_mtime)
    return out


def _show_path(path: bytes) -> str:
    return repr(path.decode("utf-8", "backslashreplace")) if path else "'.'"


def _show_value(field: str, value: object) -> str:
    if field == "mode" and isinstance(value, int):
        return oct(value)
    if field == "digest" and isinstance(value, str):
        return value[:16]
    return repr(value)


def diff_manifests(a: Manifest, b: Manifest) -> list[str]:
    """One line per difference (``path: field: value in a != value in b``), in path
    order; empty when the manifests are equal. A path of another kind is one line."""
    lines: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        x, y = a.get(path), b.get(path)
        shown = _show_path(path)
        if y is None:
            assert x is not None
            lines.append(f"{shown}: only in first ({x.kind})")
        elif x is None:
            lines.append(f"{shown}: only in second ({y.kind})")
        elif x.kind != y.kind:
            lines.append(f"{shown}: kind: {x.kind!r} != {y.kind!r}")
        else:
            for field, va, vb in zip(Item._fields, x, y):
                if va != vb:
                    shown_a, shown_b = _show_value(field, va), _show_value(field, vb)
                    lines.append(f"{shown}: {field}: {shown_a} != {shown_b}")
    return lines


def assert_same_tree(src: Path, dst: Path, *, symlink_mtimes: bool = False,
                     ignore_dir_mtime: bool = False, include_root: bool = False) -> None:
    """Raise ``AssertionError`` naming the first 20 differences between two trees (or
    two files); the options are ``manifest``'s."""
    __tracebackhide__ = True
    a, b = (manifest(path, symlink_mtimes=symlink_mtimes, ignore_dir_mtime=ignore_dir_mtime,
                     include_root=include_root) for path in (src, dst))
    diffs = diff_manifests(a, b)
    if diffs:
        raise AssertionError(f"{src} and {dst} differ in {len(diffs)} ways"
                             + (", the first 20" if len(diffs) > 20 else "") + ":\n  "
                             + "\n  ".join(diffs[:20]))


# -- mutate_tree ---------------------------------------------------------------------------


def mutate_tree(root: Path, *, seed: int, rewrite_fraction: float = 0.05,
                add_fraction: float = 0.10, remove_fraction: float = 0.02) -> Mutation:
    """Change a tree (made by ``make_tree`` or any other) for incremental-import tests.

    Of the regular files with content and a single name (rewriting one name of a hard
    link would change the other too): ``rewrite_fraction`` (at least one) get new random
    bytes of the same size, written in place, and an mtime 1 s later; ``remove_fraction``
    are deleted. ``add_fraction`` of the regular-file count (at least one) are added as
    new random files in directories that hold files already, plus a directory
    ``added-dir`` holding ``inside``. Every directory that gained or lost an entry gets
    an mtime 1 s later. Deterministic given the tree and ``seed``."""
    rnd = random.Random(seed)
    r = os.fsencode(root)

    def p(rel: bytes) -> bytes:
        return _join(r, rel)

    entries = list(_walk(r))
    regular = [rel for rel, st in entries if stat.S_ISREG(st.st_mode)]
    candidates = [rel for rel, st in entries
                  if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size > 0]
    dirs = [b""] + [rel for rel, st in entries if stat.S_ISDIR(st.st_mode)]
    file_dirs = sorted({rel.rpartition(b"/")[0] for rel in regular})  # where new files go
    n_rewrite = max(1, round(rewrite_fraction * len(candidates))) if rewrite_fraction > 0 else 0
    n_remove = round(remove_fraction * len(candidates))
    n_add = max(1, round(add_fraction * len(regular))) if add_fraction > 0 else 0
    if n_rewrite + n_remove > len(candidates):
        raise ValueError(f"{root}: {len(candidates)} files cannot take {n_rewrite} rewrites "
                         f"and {n_remove} removals")
    chosen = rnd.sample(candidates, n_rewrite + n_remove)
    rewrite, remove = sorted(chosen[:n_rewrite]), sorted(chosen[n_rewrite:])
    dir_mtimes = {rel: os.lstat(p(rel)).st_mtime_ns for rel in dirs}
    touched: set[bytes] = set()
    new_bytes = 0

    for rel in rewrite:
        st = os.lstat(p(rel))
        with open(p(rel), "rb") as f:
            old = f.read()
        data = rnd.randbytes(st.st_size)
        while data == old:
            data = rnd.randbytes(st.st_size)
        os.chmod(p(rel), stat.S_IMODE(st.st_mode) | stat.S_IWUSR)  # a 0o444 file too
        fd = os.open(p(rel), os.O_WRONLY | os.O_NOFOLLOW)  # in place: same inode
        try:
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        os.chmod(p(rel), stat.S_IMODE(st.st_mode))
        os.utime(p(rel), ns=(st.st_atime_ns, st.st_mtime_ns + MTIME_STEP_NS))
        new_bytes += len(data)

    for rel in remove:
        os.unlink(p(rel))
        touched.add(rel.rpartition(b"/")[0])

    added: list[bytes] = []
    t = BASE_MTIME_NS + (7 << 40)  # after every mtime make_tree's counter gives out
    for i in range(n_add):
        parent = rnd.choice(file_dirs)
        rel = _join(parent, b"added-%03d" % i)
        size = rnd.choice((0, 1, rnd.randrange(2, 64 << 10), rnd.randrange(64 << 10, 300 << 10)))
        data = rnd.randbytes(size)
        _write(p(rel), data)
        t += MTIME_STEP_NS
        os.utime(p(rel), ns=(t, t))
        added.append(rel)
        touched.add(parent)
        new_bytes += len(data)
    os.mkdir(p(b"added-dir"))
    os.chmod(p(b"added-dir"), 0o755)
    data = rnd.randbytes(1000)
    _write(p(b"added-dir/inside"), data)
    new_bytes += len(data)
    for rel in (b"added-dir/inside", b"added-dir"):
        t += MTIME_STEP_NS
        os.utime(p(rel), ns=(t, t))
    added += [b"added-dir", b"added-dir/inside"]
    touched.add(b"")

    for rel in touched:
        ns = dir_mtimes[rel] + MTIME_STEP_NS
        os.utime(p(rel) if rel else r, ns=(ns, ns))
    return Mutation(modified=rewrite, added=sorted(added), removed=remove, new_bytes=new_bytes)

"""Checking and repairing a host's local cache for one repository (``cafs fsck --cache``).

Checks that the LMDB environment opens and reads; that every cached node matches its
id; that every chunk extent lies in its sparse file and its bytes match the chunk the
pack's trailer names at that offset; and that the recorded cache size is the sum of the
extents. An extent of a pack the repository no longer has (``cafs gc`` removed or
repacked it) is no damage: it cannot be checked against a trailer, so it is counted
(``CacheReport.gone``), not reported, and a repair leaves it (a mount of a snapshot that
was forgotten, or whose spans still name a repacked pack, reads it, verified against the
chunk id as every cached read is; the cache evicts it in time). Repair drops what does not verify and fixes the size; an LMDB file that does
not open or read is moved aside (``meta.lmdb.damaged-<time>``) and rebuilt from what can
be verified: the sparse files are scanned against the packs' trailers. The cache is never
the only copy of anything: everything in it can be fetched again from the repository.
A cache of a newer layout than this cafs reads is no damage: ``CacheLayoutError`` is
raised, and nothing is written (``cafs.metacache``). Nor is a cache this user may not
use: one whose directories other users could write (``cafs.cachedir.check_tree``, and
the directories above it) raises ``UnsafeCacheDir`` naming them and the ``chmod`` that
mends them, and one that cannot be opened for another reason than damage (a directory
or file this user may not write) raises ``MetaCacheError``, before anything is read or
moved: a repair would otherwise take them for a damaged LMDB file and move it aside.

LMDB does not checksum its pages; a damaged file is detected when LMDB itself refuses it
or a read fails, and by the verification of every value read.

Mounts (and ``cafs prefetch``) may use the cache while it is checked: the size is
compared with the extents of the same transaction, an extent that a mount evicts while
it is read is not a problem, and the size a repair sets is summed in its own write
transaction. Moving a damaged LMDB file aside while a mount has it open leaves that
mount on the old file until it ends (each verifies what it reads).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from cafs import cachedir
from cafs.chunkcache import _EXTENT, ChunkCache, extent_key, unpack_record
from cafs.errors import CafsError, IntegrityError, StoreError
from cafs.format.location import Location, decode_stored
from cafs.ids import digest
from cafs.metacache import MetaCache, MetaCacheError
from cafs.repository import Repository


@dataclass
class CacheReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    nodes: int = 0
    extents: int = 0
    gone: int = 0  # extents of packs the repository no longer has: not checked


class _Trailers:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.sizes = repo.list_packs()
        self._by_pack: dict[bytes, dict[int, Location]] = {}

    def gone(self, pack: bytes) -> bool:
        """Whether the repository has no pack ``pack`` (as listed when the check began)."""
        return pack not in self.sizes

    def at(self, pack: bytes, offset: int) -> Location | None:
        if pack not in self._by_pack:
            try:
                summary = self.repo.read_trailer(pack, self.sizes[pack])
                self._by_pack[pack] = {loc.offset: loc for loc in summary.entries}
            except (KeyError, CafsError, StoreError):
                self._by_pack[pack] = {}
        return self._by_pack[pack].get(offset)


def check_cache(repo: Repository, cache_dir: Path, *, repair: bool) -> CacheReport:
    root = cache_dir / repo.config.repo_id
    report = CacheReport(root)
    trailers = _Trailers(repo)
    cachedir.check_tree(root)  # others could plant symlinks for a repair to write through
    if not (root / "meta.lmdb").exists():
        if any((root / "data").glob("*/*")):
            report.problems.append(f"{root / 'meta.lmdb'}: missing, but cached chunk files are there")
            if repair:
                _rebuild(root, trailers, report)
        return report
    try:
        meta = MetaCache(root)
    except MetaCacheError as exc:
        if not exc.damaged:
            raise  # a newer cafs's (CacheLayoutError), or one this user may not write: no repair may touch it
        _damaged(root, exc, trailers, report, repair)
        return report
    try:
        try:
            _check_contents(meta, ChunkCache(root, meta.env, 1 << 62), trailers, report, repair)
        finally:
            meta.close()
    except (CafsError, lmdb.Error) as exc:
        _damaged(root, exc, trailers, report, repair)
    return report


def _damaged(root: Path, exc: Exception, trailers: _Trailers, report: CacheReport, repair: bool) -> None:
    report.problems.append(f"{root / 'meta.lmdb'}: damaged ({exc})")
    if repair:
        _rebuild(root, trailers, report)


def _check_contents(meta: MetaCache, cache: ChunkCache, trailers: _Trailers, report: CacheReport,
                    repair: bool) -> None:
    bad_nodes = []
    with meta.env.begin(db=meta.nodes_db) as txn:
        for key, value in txn.cursor():
            report.nodes += 1
            if digest(value) != key:
                bad_nodes.append(bytes(key))
    for key in bad_nodes:
        report.problems.append(f"cached node {key.hex()[:16]} does not match its id")
        if repair:
            meta.delete(key)
            report.repaired.append(f"dropped cached node {key.hex()[:16]}")
    # the extents and the recorded size from one transaction: mounts using the cache
    # insert and evict while it is checked
    with meta.env.begin() as txn:
        extents = [(bytes(k), unpack_record(_EXTENT, v)[0]) for k, v in txn.cursor(db=cache.extents)]
        recorded = int.from_bytes(txn.get(b"size", db=cache.stat) or bytes(8), "big")
    total = sum(length for _key, length in extents)
    if recorded != total:
        report.problems.append(f"recorded cache size {recorded} differs from the extents' {total}")
        if repair:
            total = _recount(meta, cache)
            report.repaired.append(f"cache size set to {total}")
    for key, length in extents:
        report.extents += 1
        pack, offset = key[:32], int.from_bytes(key[32:], "big")
        if trailers.gone(pack):
            report.gone += 1
            continue
        why = _check_extent(cache, trailers, pack, offset, length)
        if why is None:
            continue
        report.problems.append(f"cache extent {pack.hex()[:16]}@{offset}: {why}")
        if repair:
            cache.drop(pack, offset)
            report.repaired.append(f"dropped cache extent {pack.hex()[:16]}@{offset}")
    cache.close()


def _recount(meta: MetaCache, cache: ChunkCache) -> int:
    """Set the recorded size to the sum of the extents, in one write transaction (so
    that no insert or eviction of a mount comes between); returns it."""
    with meta.env.begin(write=True) as txn:
        total: int = sum(unpack_record(_EXTENT, v)[0] for _k, v in txn.cursor(db=cache.extents))
        txn.put(b"size", total.to_bytes(8, "big"), db=cache.stat)
    return total


def _check_extent(cache: ChunkCache, trailers: _Trailers, pack: bytes, offset: int, length: int) -> str | None:
    """Why the extent at ``(pack, offset)`` of ``length`` bytes is bad, or None. A mount
    may evict it (and punch its bytes out) while it is read, or write it anew: it is bad
    only if it fails twice while recorded as it was."""
    why = None
    for _attempt in range(2):
        why = _verify_extent(cache, trailers, pack, offset, length)
        if why is None or not cache.cached([(pack, offset, length)])[0]:
            return None
    return why


def _verify_extent(cache: ChunkCache, trailers: _Trailers, pack: bytes, offset: int, length: int) -> str | None:
    loc = trailers.at(pack, offset)
    if loc is None or loc.stored_length != length:
        return "no such chunk in the repository"
    stored = cache.read(pack, offset, length)
    if stored is None:
        return "bytes missing from the sparse file"
    try:
        decode_stored(loc, stored)
    except IntegrityError:
        return "bytes do not match the chunk id"
    return None


def _rebuild(root: Path, trailers: _Trailers, report: CacheReport) -> None:
    damaged = root / f"meta.lmdb.damaged-{int(time.time())}"
    if (root / "meta.lmdb").exists():
        shutil.move(root / "meta.lmdb", damaged)
    meta = MetaCache(root)
    cache = ChunkCache(root, meta.env, 1 << 62)
    kept = 0
    try:
        data = root / "data"
        for path in sorted(data.glob("*/*")) if data.is_dir() else []:
            try:
                pack = bytes.fromhex(path.name)
            except ValueError:
                continue
            if not path.is_file():
                continue  # not a cache file: nothing to keep from it
            trailers.at(pack, 0)
            for loc in trailers._by_pack.get(pack, {}).values():
                with open(path, "rb") as f:
                    stored = os.pread(f.fileno(), loc.stored_length, loc.offset)
                try:
                    decode_stored(loc, stored)
                except IntegrityError:
                    continue
                cache.insert(pack, [(loc.offset, stored)])
                kept += 1
    finally:
        cache.close()
        meta.close()
    what = f"moved the damaged LMDB to {damaged.name} and rebuilt it" if damaged.exists() else "rebuilt the missing LMDB"
    report.repaired.append(f"{what}: {kept} verified extent(s) kept")


__all__ = ["check_cache", "CacheReport", "extent_key"]

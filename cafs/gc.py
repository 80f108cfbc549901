"""Forgetting snapshots and reclaiming the packs no snapshot references.

``forget`` removes journal entries; it never removes the newest entry of a ref, so a
ref's jids only grow. ``collect`` runs under the repository's exclusive lock (see
``cafs.locks``): imports hold a shared lock for their whole run, so no import can be
deduplicating against a pack while gc decides it is garbage. A dry run writes and
deletes nothing, so it holds a shared lock: it runs beside imports (reporting what a gc
would do as the repository stands when it reads it) and never makes them fail as "in
use", while a real gc still cannot delete what the dry run is reading.

Liveness is by object id: every node and chunk reachable from a remaining snapshot.
A pack with no live object is deleted; a pack whose live objects hold less than
``repack_below`` of its objects' bytes (its trailer not counted, so a pack of live
objects alone is never repacked) is repacked: its live objects are copied verbatim (same
stored bytes, codec and lengths) into new packs, and the old pack is deleted. Spans that
still name the old pack are then resolved by id through the index (see
``Repository.read_stored``), so no node or snapshot is rewritten and root ids stay.

The order of writes keeps a repository that ``cafs fsck`` passes whenever gc is
interrupted, even by ``kill -9``: (1) new packs (self-describing, found by their
trailers even before an index names them); (2) a new index object covering exactly the
packs that stay and the new ones; (3) the old index objects are deleted; (4) the
unreferenced and repacked packs are deleted. At every point every live object exists
in some pack, and every index names only packs that exist.

gc also removes what writers killed in the middle of an object left (``.tmp-*`` files
on a local disk, unfinished multipart uploads in S3: ``stores.base.Temporaries``) once
nothing has written to them for ``STALE_TEMPORARY_SECONDS``: under the exclusive lock
no import writes, and the age spares a writer that takes no lock (``fsck --repair``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

from cafs.errors import CafsError, UsageError
from cafs.format.journal import journal_key
from cafs.format.index import PackSummary
from cafs.format.location import Location, decode_stored
from cafs.format.nodes import Node, decode_node
from cafs.format.pack import pack_key
from cafs.locks import locked
from cafs.packwriter import copy_into_new_packs
from cafs.repository import Repository
from cafs.stores import Store
from cafs.stores.base import Temporaries
from cafs.tree import reachable

STALE_TEMPORARY_SECONDS = 3600.0


class GcRefused(CafsError):
    """gc cannot know what is referenced (an unreadable snapshot), so it deletes nothing."""


@dataclass
class GcResult:
    snapshots: int = 0
    packs_total: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    reclaimed_bytes: int = 0
    repacked: int = 0
    temporaries: int = 0  # temporary files of killed writers removed
    temporary_bytes: int = 0


def forget(repo: Repository, name: str, *, keep_last: int | None = None, jids: list[int] | None = None) -> list[int]:
    """Remove journal entries of ``name``; returns the jids removed."""
    if keep_last is not None and keep_last < 1:
        raise UsageError(f"--keep-last {keep_last}: must be at least 1 (the newest snapshot of a ref is always kept)")
    existing = repo.jids(name)
    if not existing:
        raise CafsError(f"{repo.url}: no ref named {name!r}")
    if keep_last is not None:
        doomed = existing[:-keep_last]
    else:
        assert jids is not None
        unknown = sorted(set(jids) - set(existing))
        if unknown:
            raise CafsError(f"ref {name!r} has no snapshot(s) {unknown}")
        if existing[-1] in jids:
            raise CafsError(f"{name}@{existing[-1]} is the newest snapshot of {name!r}; it is kept so jids only grow")
        doomed = sorted(set(jids))
    for jid in doomed:
        repo.store.delete(journal_key(name, jid))
    return doomed


def live_objects(repo: Repository) -> tuple[int, set[bytes]]:
    """(number of snapshots, ids of every node and chunk some snapshot references)."""
    live: set[bytes] = set()
    walked: set[bytes] = set()
    snaps = repo.snapshots()

    def node_of(loc: Location) -> Node:
        return decode_node(repo.read_object(loc))

    for snap in snaps:
        if snap.root.ref is None:
            continue
        try:
            live.update(loc.id for loc in reachable(node_of, snap.root.ref, walked))
        except CafsError as exc:
            raise GcRefused(f"snapshot {snap.ref}@{snap.jid} cannot be read ({exc}); "
                            "run cafs fsck; gc deletes nothing until every snapshot reads") from None
    return len(snaps), live


def collect(repo: Repository, *, dry_run: bool = False, repack_below: float = 0.5) -> GcResult:
    """Delete packs no snapshot references; repack those whose live share of bytes is
    below ``repack_below``. See the module docstring for the order of writes."""
    with locked(repo.store, "shared" if dry_run else "exclusive") as lock:
        index = repo.load_index()
        result = GcResult(packs_total=len(index.packs))
        result.snapshots, live = live_objects(repo)
        doomed, repack, kept = [], [], []
        for summary in index.packs.values():
            live_bytes = sum(e.stored_length for e in summary.entries if e.id in live)
            # the share of the objects' bytes, not of the pack's: a small pack is mostly
            # trailer, and a repack would make the same pack again, at every gc
            body = sum(e.stored_length for e in summary.entries)
            if live_bytes == 0:
                doomed.append(summary)
            elif live_bytes < repack_below * body:
                repack.append(summary)
            else:
                kept.append(summary)
        primary = repo.primary
        if not dry_run and isinstance(primary, Temporaries):
            # retried as any store operation is: removing is idempotent
            result.temporaries, result.temporary_bytes = repo.store.read(
                lambda _store: primary.remove_temporaries("", STALE_TEMPORARY_SECONDS))
        result.deleted_packs = sorted(p.pack_id.hex() for p in doomed + repack)
        result.repacked = len(repack)
        gone = sum(p.length for p in doomed + repack)
        if dry_run or not (doomed or repack):
            result.reclaimed_bytes = gone - sum(
                e.stored_length for p in repack for e in p.entries if e.id in live)
            return result
        written = _repack(repo, repack, live, {e.id for p in kept for e in p.entries})
        result.reclaimed_bytes = gone - sum(p.length for p in written)
        lock.check()  # without it, an import may have begun to use what is about to go
        repo.replace_indexes(kept + written)
        for summary in doomed + repack:
            repo.delete_pack(summary.pack_id)
        return result


def _repack(repo: Repository, packs: list[PackSummary], live: set[bytes], elsewhere: set[bytes]) -> list[PackSummary]:
    """Copy the live objects of ``packs`` verbatim into new packs; returns the new packs."""
    def objects() -> Iterator[tuple[int, Location, bytes]]:
        copied: set[bytes] = set()
        for summary in packs:
            for loc in summary.entries:
                if loc.id not in live or loc.id in elsewhere or loc.id in copied:
                    continue
                # never copy a damaged object over a good one; read again what fails on the way
                stored = repo.store.read(partial(_verified, loc=loc))
                copied.add(loc.id)
                yield summary.kind, loc, stored
    return copy_into_new_packs(repo.pack_store, repo.config.pack_size, objects())


def _verified(store: Store, loc: Location) -> bytes:
    """The stored bytes of ``loc``, raising IntegrityError unless they match its id."""
    stored = store.get(pack_key(loc.pack), loc.offset, loc.stored_length)
    decode_stored(loc, stored)
    return stored

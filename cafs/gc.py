"""Forgetting snapshots and reclaiming the packs no snapshot references.

``forget`` removes journal entries; it never removes the newest entry of a ref, so a
ref's jids only grow. ``collect`` runs under the repository's exclusive lock (see
``cafs.locks``): imports hold a shared lock for their whole run, so no import can be
deduplicating against a pack while gc decides it is garbage.

The order of ``collect``'s writes keeps a repository that ``cafs fsck`` passes whenever
it is interrupted (even by ``kill -9``): (1) a new index object covering exactly the
packs that stay; (2) the old index objects are deleted; (3) the unreferenced packs are
deleted. At every point, every index names only packs that exist, and every snapshot's
objects exist.

Caveat: packs that are partly garbage are reported, not rewritten. A span names its pack
and offset, so moving live chunks to a new pack means rewriting every node above them
and the snapshots' roots; that needs a format change (a relocation map or rewritten
snapshots) and is left for a later version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cafs.errors import CafsError
from cafs.format.journal import journal_key
from cafs.format.location import Location
from cafs.format.nodes import DirIndexNode, FileNode, TreeNode, decode_node
from cafs.locks import locked
from cafs.repository import Repository


class GcRefused(CafsError):
    """gc cannot know what is referenced (an unreadable snapshot), so it deletes nothing."""


@dataclass
class GcResult:
    snapshots: int = 0
    packs_total: int = 0
    deleted_packs: list[str] = field(default_factory=list)
    reclaimed_bytes: int = 0
    kept_bytes: int = 0
    partly_garbage: list[tuple[str, float]] = field(default_factory=list)  # pack, live fraction


def forget(repo: Repository, name: str, *, keep_last: int | None = None, jids: list[int] | None = None) -> list[int]:
    """Remove journal entries of ``name``; returns the jids removed."""
    existing = repo.jids(name)
    if not existing:
        raise CafsError(f"{repo.url}: no ref named {name!r}")
    if keep_last is not None:
        if keep_last < 1:
            raise CafsError("--keep-last must be at least 1 (the newest snapshot of a ref is always kept)")
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


def referenced(repo: Repository) -> tuple[int, dict[bytes, int]]:
    """(number of snapshots, pack id -> live stored bytes) over every snapshot."""
    live: dict[bytes, dict[int, int]] = {}
    seen_nodes: set[bytes] = set()

    def use(loc: Location) -> None:
        live.setdefault(loc.pack, {})[loc.offset] = loc.stored_length

    snaps = repo.snapshots()
    for snap in snaps:
        stack: list[Location] = [snap.root.ref] if snap.root.ref else []
        while stack:
            loc = stack.pop()
            use(loc)
            if loc.id in seen_nodes:
                continue
            seen_nodes.add(loc.id)
            try:
                node = decode_node(repo.read_object(loc))
            except CafsError as exc:
                raise GcRefused(f"snapshot {snap.ref}@{snap.jid} cannot be read ({exc}); "
                                "run cafs fsck; gc deletes nothing until every snapshot reads") from None
            if isinstance(node, TreeNode):
                for e in node.entries:
                    if e.ref is not None:
                        stack.append(e.ref)
                    for span in e.spans or ():
                        use(span)
            elif isinstance(node, DirIndexNode):
                stack.extend(p.ref for p in node.pages)
            elif isinstance(node, FileNode):
                for span in node.spans:
                    use(span)
    return len(snaps), {pack: sum(offsets.values()) for pack, offsets in live.items()}


def collect(repo: Repository, *, dry_run: bool = False, report_below: float = 0.5) -> GcResult:
    """Delete every pack no snapshot references; see the module docstring."""
    with locked(repo.store, "exclusive"):
        sizes = repo.list_packs()
        result = GcResult(packs_total=len(sizes))
        result.snapshots, live = referenced(repo)
        doomed = [p for p in sizes if p not in live]
        for pack, size in sizes.items():
            if pack in live:
                result.kept_bytes += size
                if live[pack] < report_below * size:
                    result.partly_garbage.append((pack.hex(), live[pack] / size))
        result.deleted_packs = sorted(p.hex() for p in doomed)
        result.reclaimed_bytes = sum(sizes[p] for p in doomed)
        if dry_run or not doomed:
            return result
        old_indexes = [key for key, _ in repo.store.list("index/")]
        index = repo.load_index()
        new_key = repo.write_index([s for p, s in index.packs.items() if p in live])
        for key in old_indexes:
            if key != new_key:
                repo.store.delete(key)
        for pack in doomed:
            repo.delete_pack(pack)
        return result

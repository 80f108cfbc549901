"""Copying snapshots from one repository to another (``cafs copy``): how a mirror is filled.

Contract: ``copy_snapshots(src, dst, wanted)`` makes each wanted journal entry of SRC
(a ref name and a jid) exist in DST under the same key with the same bytes, so that
``REPO#NAME@JID`` names the same snapshot in both, with every node and chunk it
references readable in DST. In order:

1. Journal entries DST already holds with the same bytes are skipped. One that DST holds
   with other bytes is a ``CopyConflict`` naming the ref and jid, raised before anything
   is written; nothing is ever overwritten.
2. The DAG of every remaining snapshot is walked over SRC (``cafs.tree.reachable``) to
   find the SRC packs holding its nodes and chunks (for an object gc has repacked, the
   pack holding it now). Only those packs are copied, never a whole repository.
3. Packs DST lacks are copied verbatim (same key, same bytes), ``jobs`` at a time. A pack
   DST holds under the same key with the same length counts as present; one of another
   length (truncated) is replaced. Each pack is read whole from SRC and verified before
   it is written (``verify_pack``: trailer, body digest, every object against its id);
   one that fails is read again (``Repository.read_pack``: a byte flipped on the way
   heals), and one that keeps failing raises ``SourcePackDamaged`` naming it, and
   nothing of it is written.
4. Index objects naming the copied packs (one per ``INDEX_EVERY`` packs, each written
   after its packs), so DST finds objects by id without reading every pack's trailer.
5. The journal entries, byte for byte, by exclusive put, in ascending jid per ref.

Journal entries are written last: an interrupted copy (``kill -9``, a full disk, a store
gone) leaves no ref of DST pointing at missing data, and running it again resumes: the
packs already copied are present and skipped. The whole copy holds a shared lock on DST
(``cafs.locks``), as an import does, so no gc on DST deletes what is being copied.

``open_destination`` opens DST, or creates it with SRC's config: the same chunker
parameters, pack size and repo id. A mirror is the same repository in another place
(same packs at the same offsets, same nodes, same journal), so it keeps the repo id: a
host's cache (kept per repo id) is valid for both, and ``cafs fsck --repair --mirror``
accepts the mirror's journal entries. An existing DST with another config works as
well: packs are copied verbatim and every reference is a content id or a pack's name,
none depends on the config; later imports into DST then dedup less against the copied
data (other chunk cut points), which ``CopyResult.config_differs`` reports.

Only the ``Store`` protocol and ``Repository`` methods are used, so any two stores work.

Raises: ``RepositoryError`` (SRC is not a repository; DST is neither a repository nor
empty; DST is of an older format version than SRC, whose readers could not read SRC's
entries, copied verbatim), ``RefError`` (unknown ref or jid), ``CopyConflict``, ``SourcePackDamaged``,
``CopyError`` (an object or pack missing from SRC), ``RepositoryLocked`` (a gc holds
DST), ``NoSpaceError`` and other ``StoreError`` from either store.

Caveats:

- SRC is not locked (it may be a read-only HTTP server). A gc that repacks SRC during a
  copy makes a pack vanish: the copy stops with an error naming it; run it again.
- Memory: up to ``jobs`` whole packs (``pack_size`` each, 64 MiB by default) at once.
- The unit copied is the pack: a pack that also holds objects of snapshots not being
  copied comes whole (a gc on DST reclaims what no DST snapshot references).
- Packs copied by an interrupted run after its last index object was written are named
  by no index object in DST (as after an interrupted import); readers learn them from
  their trailers, and the next gc on DST writes a complete index.
- A DST ref with entries of its own (imports into DST) may have a newer entry than the
  one copied; ``DST#NAME`` then names that one. A mirror that only ever receives copies
  has the same journal as its source.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from cafs.errors import (
    CafsError, FormatError, IntegrityError, NoSpaceError, ObjectNotFound, RefError, RepositoryError,
    UsageError,
)
from cafs.format.index import PackSummary
from cafs.format.journal import Snapshot, check_ref_name, decode_snapshot, journal_key
from cafs.format.location import Location
from cafs.format.nodes import Node, decode_node
from cafs.format.pack import pack_key, verify_pack
from cafs.locks import locked
from cafs.naming import find_snapshot, ref_name
from cafs.repository import Repository
from cafs.sources import DEFAULT_DEADLINE
from cafs.stores import ObjectExists, Store
from cafs.tree import reachable

JOBS = 4
INDEX_EVERY = 256


class CopyError(CafsError):
    """A copy cannot go on; nothing of it was committed in the destination."""


class CopyConflict(CopyError):
    """The destination holds another journal entry under the key of one being copied."""


class SourcePackDamaged(CopyError):
    """A pack of the source fails verification; it was not copied."""


@dataclass
class CopyProgress:
    """Live counters for a progress line; written by the copy, read by anyone."""

    stage: str = "reading journals"
    nodes_read: int = 0
    packs_total: int = 0
    packs_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class CopyResult:
    copied: list[str] = field(default_factory=list)  # "ref@jid" written to DST
    present: list[str] = field(default_factory=list)  # "ref@jid" DST held already
    packs_copied: int = 0
    packs_present: int = 0  # needed packs DST held already
    bytes_copied: int = 0
    seconds: float = 0.0
    config_differs: bool = False  # DST has other chunker parameters or pack size


def select_snapshots(src: Repository, selector: str, *, every: bool) -> list[tuple[str, int]]:
    """``(ref, jid)`` pairs a command line names: ``selector`` as after ``REPO#`` (a ref,
    ``NAME@JID`` or a root id) for one snapshot; with ``every``, every snapshot of every
    ref (empty ``selector``) or of the ref ``selector``."""
    if not every:
        if not selector:
            raise UsageError("name a snapshot as SRC#NAME or SRC#NAME@JID, or copy every one with --all")
        snap = find_snapshot(src, selector)
        return [(snap.ref, snap.jid)]
    if "@" in selector:
        raise UsageError(f"{selector!r}: --all copies every snapshot of a ref; name the ref without '@JID'")
    names = [ref_name(selector)] if selector else src.ref_names()
    wanted = [(name, jid) for name in names for jid in src.jids(name)]
    if selector and not wanted:
        raise RefError(f"{src.url}: no ref named {selector!r}")
    return wanted


def open_destination(src: Repository, store: Store, *,
                     deadline: float = DEFAULT_DEADLINE) -> tuple[Repository, bool]:
    """(DST, whether it was created): an existing repository, or a new one in an empty
    store with SRC's config, repo id included; its writes retried until ``deadline``."""
    try:
        return Repository.open(store, deadline=deadline), False
    except RepositoryError:
        if any(True for _ in store.list("")):
            raise  # not empty and not (readably) a repository: say why opening failed
    c = src.config
    return Repository.init(store, c.chunker, c.pack_size, repo_id=c.repo_id, version=c.version,
                           deadline=deadline), True


def copy_snapshots(src: Repository, dst: Repository, wanted: Iterable[tuple[str, int]], *,
                   read_node: Callable[[Location], Node] | None = None, jobs: int = JOBS,
                   index_every: int = INDEX_EVERY, progress: CopyProgress | None = None) -> CopyResult:
    """Copy the journal entries ``wanted`` and what they reference from SRC to DST (see
    the module docstring). ``read_node`` reads a node of SRC (default: from the store,
    verified; the command passes one that goes through the host's metadata cache)."""
    started = time.monotonic()
    if dst.config.version < src.config.version:  # entries are copied verbatim: 2 adds digests, 3 blocks
        raise RepositoryError(
            f"{dst.url}: repository format version {dst.config.version}, whose readers cannot read the "
            f"entries of {src.url} (version {src.config.version}); copy into a new or empty repository instead")
    state = progress or CopyProgress()
    result = CopyResult(config_differs=(src.config.chunker, src.config.pack_size)
                        != (dst.config.chunker, dst.config.pack_size))
    entries = _read_entries(src, sorted(set(wanted)))
    with locked(dst.store, "shared") as lock:
        todo = _entries_to_copy(dst, entries, result)
        if todo:
            state.stage = "finding the packs the snapshots need"
            needed = _needed_packs(src, [snap for snap, _raw in todo], read_node, state)
            have = dst.list_packs()
            missing = {p: n for p, n in needed.items() if have.get(p) != n}
            result.packs_present = len(needed) - len(missing)
            state.stage = "copying packs"
            _copy_packs(src, dst, missing, jobs, index_every, state, result)
            state.stage = "writing journal entries"
            lock.check()  # a gc that took the lock for stale may have removed the copied packs
            _write_entries(dst, todo, result)
    result.seconds = time.monotonic() - started
    return result


def _read_entries(src: Repository, wanted: list[tuple[str, int]]) -> list[tuple[Snapshot, bytes]]:
    """Each wanted journal entry of SRC, decoded, with its exact bytes."""
    out = []
    for name, jid in wanted:
        try:
            raw = src.store.get(journal_key(check_ref_name(name), jid))
        except ObjectNotFound:
            raise RefError(f"{src.url}: ref {name!r} has no snapshot {jid}") from None
        out.append((decode_snapshot(raw, name, jid), raw))
    return out


def _entries_to_copy(dst: Repository, entries: list[tuple[Snapshot, bytes]],
                     result: CopyResult) -> list[tuple[Snapshot, bytes]]:
    """The entries DST lacks; raises CopyConflict if it holds another at any of them."""
    todo = []
    jids: dict[str, set[int]] = {}
    for snap, raw in entries:
        if snap.ref not in jids:
            jids[snap.ref] = set(dst.jids(snap.ref))
        if snap.jid in jids[snap.ref] and _same_entry(dst, snap, raw):
            result.present.append(f"{snap.ref}@{snap.jid}")
        else:
            todo.append((snap, raw))
    return todo


def _same_entry(dst: Repository, snap: Snapshot, raw: bytes) -> bool:
    """True if DST holds exactly ``raw`` at the key of ``snap``; False if it holds
    nothing there; raises CopyConflict if it holds something else."""
    try:
        theirs = dst.store.get(journal_key(snap.ref, snap.jid))
    except ObjectNotFound:
        return False
    if theirs != raw:
        raise CopyConflict(
            f"{dst.url} already has a different snapshot {snap.ref}@{snap.jid} (root "
            f"{_root_of(theirs, snap)}, the source's is {snap.root_id.hex()[:16]}): the two "
            f"journals of ref {snap.ref!r} have diverged; nothing was copied or overwritten")
    return True


def _root_of(raw: bytes, snap: Snapshot) -> str:
    try:
        return decode_snapshot(raw, snap.ref, snap.jid).root_id.hex()[:16]
    except CafsError:
        return "unreadable"


def _needed_packs(src: Repository, snaps: list[Snapshot], read_node: Callable[[Location], Node] | None,
                  state: CopyProgress) -> dict[bytes, int]:
    """SRC pack id -> length, of every pack holding a node or chunk of ``snaps``."""
    present = src.list_packs()

    def node_of(loc: Location) -> Node:
        state.nodes_read += 1
        return read_node(loc) if read_node is not None else decode_node(src.read_object(loc))

    needed: dict[bytes, int] = {}
    walked: set[bytes] = set()
    for snap in snaps:
        if snap.root.ref is None:
            continue
        for loc in reachable(node_of, snap.root.ref, walked):
            pack = loc.pack
            if pack not in present:
                moved = src.relocated(loc)  # repacked by gc: where the object lives now
                if moved is None or moved.pack not in present:
                    raise CopyError(f"{snap.ref}@{snap.jid}: object {loc.describe()} is in no pack of "
                                    f"{src.url}; run cafs fsck {src.url}")
                pack = moved.pack
            needed[pack] = present[pack]
    return needed


def _copy_packs(src: Repository, dst: Repository, packs: dict[bytes, int], jobs: int, index_every: int,
                state: CopyProgress, result: CopyResult) -> None:
    """Copy ``packs`` verified, ``jobs`` at a time (each holds one whole pack in memory),
    writing an index object after every ``index_every`` of them and after the last."""
    with state.lock:
        state.packs_total, state.bytes_total = len(packs), sum(packs.values())
    unindexed: list[PackSummary] = []
    # Largest first: the long transfers start early and the small ones fill the gaps.
    order = sorted(packs, key=lambda p: (-packs[p], p))
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="cafs-copy") as pool:
        futures: list[Future[PackSummary]] = [pool.submit(_copy_pack, src, dst, p, state) for p in order]
        try:
            for fut in as_completed(futures):
                summary = fut.result()
                result.packs_copied += 1
                result.bytes_copied += summary.length
                unindexed.append(summary)
                if len(unindexed) >= index_every:
                    dst.write_index(sorted(unindexed, key=lambda s: s.pack_id))
                    unindexed = []
        except BaseException:
            for f in futures:
                f.cancel()  # those not started; the few running finish their (atomic) puts
            raise
    dst.write_index(sorted(unindexed, key=lambda s: s.pack_id))


def _copy_pack(src: Repository, dst: Repository, pack_id: bytes, state: CopyProgress) -> PackSummary:
    key = pack_key(pack_id)
    try:  # bytes that fail are read again: a byte flipped on the way is no damaged pack
        data, trailer = src.read_pack(pack_id, lambda d: (d, verify_pack(d, pack_id, f"pack {pack_id.hex()}")))
    except ObjectNotFound:
        raise CopyError(f"pack {pack_id.hex()} vanished from {src.url} during the copy (a gc there?); "
                        "run the copy again") from None
    except (FormatError, IntegrityError) as exc:
        raise SourcePackDamaged(
            f"{src.url}: damaged pack {pack_id.hex()} ({exc}); it was not copied and no snapshot "
            f"was committed in {dst.url}; check the source with cafs fsck {src.url} --read-data "
            "(--repair --mirror URL replaces it from a good copy)") from None
    try:
        dst.store.put(key, data)
    except NoSpaceError as exc:
        raise NoSpaceError(f"{exc}; no snapshot was committed; free space and run the copy again "
                           "to resume") from None
    with state.lock:
        state.packs_done += 1
        state.bytes_done += len(data)
    return PackSummary(pack_id, len(data), trailer.kind, trailer.entries)


def _write_entries(dst: Repository, todo: list[tuple[Snapshot, bytes]], result: CopyResult) -> None:
    newest: dict[str, int] = {}
    for snap, _ in todo:
        newest[snap.ref] = max(newest.get(snap.ref, 0), snap.jid)
    _write_each(dst, todo, result)
    for name, jid in newest.items():
        dst.note_latest(name, jid)


def _write_each(dst: Repository, todo: list[tuple[Snapshot, bytes]], result: CopyResult) -> None:
    for snap, raw in todo:
        label = f"{snap.ref}@{snap.jid}"
        try:
            dst.store.put(journal_key(snap.ref, snap.jid), raw, exclusive=True)
            result.copied.append(label)
        except ObjectExists:
            _same_entry(dst, snap, raw)  # written meanwhile: fine if it is the same entry
            result.present.append(label)

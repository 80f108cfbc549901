"""Repairing what ``cafs.check`` found, without ever deleting the only copy of anything.

- A missing, truncated or corrupt pack is replaced by the mirror's copy of the same pack
  id, and only after that copy has been read whole and verified (trailer decodes, body
  digest matches, every object matches its id).
- With ``salvage``, a damaged pack with no good copy anywhere is salvaged, under the exclusive lock (no
  import deduplicates against it meanwhile): the objects that still match their ids are
  copied into new packs, a fresh index names every pack but it, and the pack is set
  aside whole under ``damaged/<pack id hex>`` (kept, never deleted: it is out of the way,
  not gone). Readers find the salvaged objects by id, as after a gc repack. The lost
  ones are then in no index, so ``cafs import --reread`` of the same data stores them
  again, and every snapshot that names them reads again. Order of writes, each safe to
  interrupt: new packs; the set-aside copy; the new index; the old indexes deleted; the
  pack deleted. Salvaging a missing pack only drops it from the index.
- A ``latest`` pointer that leads readers without listings astray is rewritten to name
  the ref's newest entry.
- A damaged index object is removed and a fresh one written from the pack trailers it
  covered (an index is a cache of trailers; the packs are the data).
- A journal entry that does not decode is replaced by the mirror's copy under the same
  key, only if the mirror is the same repository (same repo id) and its copy decodes as
  that snapshot. A journal entry has no content id to check it against; being written
  once and never changed, the same repository's copy is the same entry.

``repair`` makes one pass over a list of problems and returns what was repaired and what
could not be. ``repair_in_rounds`` is what ``cafs fsck --repair`` runs: a check sees only
as deep as the metadata it can read, so a missing or damaged metadata pack hides every
problem below the nodes it holds. After each round it checks again and, if the round
repaired anything, repairs what the check found that no earlier round tried (what the
repair made visible); it stops when a check finds nothing new, when a round repairs
nothing, or after ``MAX_REPAIR_ROUNDS`` rounds. A pack (a journal entry, an index object)
is tried in one round only: what no mirror gave in one round, none gives in the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cafs.check import Problem, Report
from cafs.errors import CafsError, IntegrityError, ObjectNotFound, RefError, StoreError
from cafs.format.index import PackSummary
from cafs.format.journal import decode_snapshot, encode_latest, is_ref_name, latest_key, parse_jid
from cafs.format.location import Location, verify_stored
from cafs.format.pack import pack_key, trailer_of, verify_pack
from cafs.locks import locked
from cafs.packwriter import copy_into_new_packs
from cafs.repository import ObjectIndex, Repository

DAMAGED_PREFIX = "damaged/"
MAX_REPAIR_ROUNDS = 4  # each round can reach one more level of damaged metadata
SALVAGEABLE = ("corrupt-pack", "truncated-pack", "missing-object", "corrupt-node", "corrupt-chunk", "missing-pack")


@dataclass
class RepairResult:
    repaired: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def verified_pack(repo: Repository, pack_id: bytes) -> bytes:
    """The whole pack ``pack_id`` from ``repo``, raising unless every byte checks out
    (read again when it does not: ``Repository.read_pack``)."""
    def check(data: bytes) -> bytes:
        verify_pack(data, pack_id, f"pack {pack_id.hex()} in {repo.url}")
        return data
    return repo.read_pack(pack_id, check)


def repair_in_rounds(repo: Repository, report: Report, mirrors: list[Repository], recheck: Callable[[], Report],
                     *, salvage: bool = False) -> tuple[RepairResult, Report]:
    """Repair what ``report`` found, ``recheck``, and go on while rounds uncover more (see
    the module docstring). Returns what all rounds repaired and could not, and the last
    check. ``report.problems`` gains what later checks found that no earlier one had, so
    it lists every problem found."""
    result = RepairResult()
    tried: set[tuple[str, str]] = set()
    todo = list(report.problems)
    after = report
    for _ in range(MAX_REPAIR_ROUNDS):
        this = repair(repo, todo, mirrors, salvage=salvage)
        result.repaired += this.repaired
        result.failed += this.failed
        tried.update(_repair_key(p) for p in todo)
        after = recheck()
        todo = [p for p in after.problems if _repair_key(p) not in tried]
        report.problems += todo
        if not todo or not this.repaired:
            break
    result.failed += [f"{p.kind} {p.subject}: found by the check after the last round of repair, not tried; "
                      "run `cafs fsck --repair` again" for p in todo]
    return result, after


def _repair_key(problem: Problem) -> tuple[str, str]:
    """What a repair of ``problem`` works on: its pack, or else the object it names."""
    return ("pack", problem.pack.hex()) if problem.pack is not None else (problem.kind, problem.subject)


def repair(repo: Repository, problems: Sequence[Problem], mirrors: list[Repository], *,
           salvage: bool = False) -> RepairResult:
    result = RepairResult()
    done: set[bytes] = set()
    salvaged: list[bytes] = []
    for problem in problems:
        if problem.kind == "bad-index":
            _rewrite_index(repo, problem, result)
        elif problem.kind == "bad-journal":
            _replace_journal(repo, problem, mirrors, result)
        elif problem.kind == "bad-latest":
            _rewrite_latest(repo, problem, result)
        elif problem.pack is not None and problem.pack not in done:
            done.add(problem.pack)
            if not _replace_pack(repo, problem, mirrors, result):
                if salvage and problem.kind in SALVAGEABLE:
                    salvaged.append(problem.pack)
                else:
                    result.failed.append(_no_copy(problem))
        elif problem.pack is None:
            result.failed.append(f"{problem.kind} {problem.subject}: no repair known")
    if salvaged:
        _salvage(repo, salvaged, result)
    return result


def _no_copy(problem: Problem) -> str:
    assert problem.pack is not None
    return (f"pack {problem.pack.hex()}: no good copy; --salvage copies its intact objects out and sets "
            "it aside, after which `cafs import --reread` of the same data stores the lost ones again")


def _replace_pack(repo: Repository, problem: Problem, mirrors: list[Repository], result: RepairResult) -> bool:
    """Whether a mirror had a good copy (then written, or the failure to write it in
    ``result.failed``: one pack this store cannot take stops no other repair)."""
    assert problem.pack is not None
    reasons = []
    for mirror in mirrors:
        try:
            data = verified_pack(mirror, problem.pack)
        except (CafsError, StoreError) as exc:
            reasons.append(f"{mirror.url}: {exc}")
            continue
        try:
            repo.store.put(pack_key(problem.pack), data)
        except StoreError as exc:  # this store cannot take it (read-only, full): no other mirror helps
            result.failed.append(f"pack {problem.pack.hex()}: the verified copy from {mirror.url} "
                                 f"could not be written: {exc}")
            return True
        result.repaired.append(f"pack {problem.pack.hex()}: replaced by the verified copy from {mirror.url}")
        return True
    for reason in reasons:
        result.failed.append(f"pack {problem.pack.hex()}: mirror {reason}")
    return False


def _salvage(repo: Repository, pack_ids: list[bytes], result: RepairResult) -> None:
    """Salvage damaged packs that have no good copy (see the module docstring)."""
    try:
        with locked(repo.store, "exclusive") as lock:
            index = repo.load_index()
            doomed = set(pack_ids)
            elsewhere = {e.id for s in index.packs.values() if s.pack_id not in doomed for e in s.entries}
            bodies = {p: body for p in pack_ids if (body := _present_body(repo, p, result)) is not None}
            intact = [obj for p, body in bodies.items() for obj in _intact(p, body, index, elsewhere, result)]
            written = copy_into_new_packs(repo.pack_store, repo.config.pack_size, intact)
            lock.check()
            for pack_id, body in bodies.items():
                repo.store.put(DAMAGED_PREFIX + pack_id.hex(), body)
            repo.replace_indexes([s for s in index.packs.values() if s.pack_id not in doomed] + written)
            for pack_id in bodies:
                repo.delete_pack(pack_id)
    except (CafsError, StoreError) as exc:
        result.failed.append(f"salvaging pack(s) {', '.join(p.hex()[:16] for p in pack_ids)}: {exc}")


def _present_body(repo: Repository, pack_id: bytes, result: RepairResult) -> bytes | None:
    """The whole damaged pack, to be set aside; None if it is missing (then it is only
    dropped from the index)."""
    try:
        return repo.store.get(pack_key(pack_id))
    except ObjectNotFound:
        result.repaired.append(f"pack {pack_id.hex()}: missing, no good copy; dropped from the index. "
                               "`cafs import --reread` of the same data stores its objects again")
        return None


def _intact(pack_id: bytes, body: bytes, index: ObjectIndex, elsewhere: set[bytes],
            result: RepairResult) -> list[tuple[int, Location, memoryview]]:
    """The objects of one damaged pack that still match their ids and that no other pack
    holds, as ``(pack kind, location, stored bytes)``; adds them to ``elsewhere``."""
    summary = index.packs.get(pack_id) or _listed_by_trailer(pack_id, body)
    view = memoryview(body)
    out: list[tuple[int, Location, memoryview]] = []
    lost = 0
    for loc in summary.entries if summary else ():
        if loc.id in elsewhere:
            continue
        stored = view[loc.offset:loc.end]
        try:
            verify_stored(loc, stored)
        except IntegrityError:
            lost += 1
            continue
        assert summary is not None
        out.append((summary.kind, loc, stored))
        elsewhere.add(loc.id)
    listing = "" if summary else " (neither an index nor its trailer lists its objects)"
    result.repaired.append(
        f"pack {pack_id.hex()}: no good copy; {len(out)} intact object(s) copied to new packs, {lost} lost{listing}; "
        f"set aside as {DAMAGED_PREFIX}{pack_id.hex()}. `cafs import --reread` of the same data stores the "
        "lost ones again")
    return out


def _listed_by_trailer(pack_id: bytes, body: bytes) -> PackSummary | None:
    """The pack's own list of its objects, if its trailer still decodes."""
    try:
        trailer = trailer_of(body, pack_id, f"pack {pack_id.hex()}")
    except CafsError:
        return None
    return PackSummary(pack_id, len(body), trailer.kind, trailer.entries)


def _replace_journal(repo: Repository, problem: Problem, mirrors: list[Repository],
                     result: RepairResult) -> None:
    key = problem.subject
    parts = key.split("/")
    jid = parse_jid(parts[-1]) if len(parts) == 3 else None
    if jid is None or not is_ref_name(parts[1]):
        result.failed.append(f"{key}: not a journal key cafs writes; remove it by hand")
        return
    reasons = []
    for mirror in mirrors:
        if mirror.config.repo_id != repo.config.repo_id:
            reasons.append(f"{mirror.url}: another repository (repo id {mirror.config.repo_id[:12]})")
            continue
        try:
            data = mirror.store.get(key)
            decode_snapshot(data, parts[1], jid)
        except (CafsError, StoreError) as exc:
            reasons.append(f"{mirror.url}: {exc}")
            continue
        try:
            repo.store.put(key, data)
        except StoreError as exc:
            result.failed.append(f"{key}: the copy from {mirror.url} could not be written: {exc}")
            return
        result.repaired.append(f"{key}: replaced by the copy from {mirror.url}")
        return
    why = "; ".join(reasons) if reasons else "no mirror given (--mirror URL)"
    result.failed.append(f"{key}: no good copy ({why})")


def _rewrite_latest(repo: Repository, problem: Problem, result: RepairResult) -> None:
    name = problem.subject.split("/")[1]
    try:
        jids = repo.jids(name)
        if not jids:
            raise RefError(f"ref {name!r} has no journal entry left")
        repo.store.put(latest_key(name), encode_latest(jids[-1]))  # replaced, not advanced: it may go down
    except (CafsError, StoreError) as exc:
        result.failed.append(f"{problem.subject}: {exc}")
        return
    result.repaired.append(f"{problem.subject}: now says {jids[-1]}, the newest entry")


def _rewrite_index(repo: Repository, problem: Problem, result: RepairResult) -> None:
    try:
        summaries = [repo.read_trailer(pack_id, size) for pack_id, size in repo.list_packs().items()]
        repo.write_index(summaries)
        repo.store.delete(problem.subject)
        result.repaired.append(f"{problem.subject}: removed; a fresh index of every pack was written")
    except (CafsError, StoreError) as exc:
        result.failed.append(f"{problem.subject}: {exc}")

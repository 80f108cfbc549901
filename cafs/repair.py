"""Repairing what ``cafs.check`` found, without ever deleting the only copy of anything.

- A missing, truncated or corrupt pack is replaced by the mirror's copy of the same pack
  id, and only after that copy has been read whole and verified (trailer decodes, body
  digest matches, every object matches its id). Without a good copy, nothing changes.
- A damaged index object is removed and a fresh one written from the pack trailers it
  covered (an index is a cache of trailers; the packs are the data).
- A journal entry that does not decode is replaced by the mirror's copy under the same
  key, only if the mirror is the same repository (same repo id) and its copy decodes as
  that snapshot. A journal entry has no content id to check it against; being written
  once and never changed, the same repository's copy is the same entry.

Returns what was repaired and what could not be; the caller re-checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cafs.check import Problem, Report
from cafs.errors import CafsError, StoreError
from cafs.format.journal import decode_snapshot, parse_jid
from cafs.format.pack import pack_key, verify_pack
from cafs.repository import Repository


@dataclass
class RepairResult:
    repaired: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def verified_pack(repo: Repository, pack_id: bytes) -> bytes:
    """The whole pack ``pack_id`` from ``repo``, raising unless every byte checks out."""
    data = repo.store.get(pack_key(pack_id))
    verify_pack(data, pack_id, f"pack {pack_id.hex()} in {repo.url}")
    return data


def repair(repo: Repository, report: Report, mirrors: list[Repository]) -> RepairResult:
    result = RepairResult()
    done: set[bytes] = set()
    for problem in report.problems:
        if problem.kind == "bad-index":
            _rewrite_index(repo, problem, result)
        elif problem.kind == "bad-journal":
            _replace_journal(repo, problem, mirrors, result)
        elif problem.pack is not None and problem.pack not in done:
            done.add(problem.pack)
            _replace_pack(repo, problem, mirrors, result)
        elif problem.pack is None:
            result.failed.append(f"{problem.kind} {problem.subject}: no repair known")
    return result


def _replace_pack(repo: Repository, problem: Problem, mirrors: list[Repository], result: RepairResult) -> None:
    assert problem.pack is not None
    reasons = []
    for mirror in mirrors:
        try:
            data = verified_pack(mirror, problem.pack)
        except (CafsError, StoreError) as exc:
            reasons.append(f"{mirror.url}: {exc}")
            continue
        repo.store.put(pack_key(problem.pack), data)
        result.repaired.append(f"pack {problem.pack.hex()}: replaced by the verified copy from {mirror.url}")
        return
    why = "; ".join(reasons) if reasons else "no mirror given (--mirror URL)"
    result.failed.append(f"pack {problem.pack.hex()}: no good copy ({why})")


def _replace_journal(repo: Repository, problem: Problem, mirrors: list[Repository],
                     result: RepairResult) -> None:
    key = problem.subject
    parts = key.split("/")
    jid = parse_jid(parts[-1]) if len(parts) == 3 else None
    if jid is None:
        result.failed.append(f"{key}: not a journal key")
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
        repo.store.put(key, data)
        result.repaired.append(f"{key}: replaced by the copy from {mirror.url}")
        return
    why = "; ".join(reasons) if reasons else "no mirror given (--mirror URL)"
    result.failed.append(f"{key}: no good copy ({why})")


def _rewrite_index(repo: Repository, problem: Problem, result: RepairResult) -> None:
    try:
        summaries = [repo.read_trailer(pack_id, size) for pack_id, size in repo.list_packs().items()]
        repo.write_index(summaries)
        repo.store.delete(problem.subject)
        result.repaired.append(f"{problem.subject}: removed; a fresh index of every pack was written")
    except (CafsError, StoreError) as exc:
        result.failed.append(f"{problem.subject}: {exc}")

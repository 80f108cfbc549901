"""Parsing what a user types to name a snapshot: ``REPO#NAME``, ``REPO#NAME@JID``,
``REPO#ROOTID`` (64 hex digits, or a unique prefix of at least 8), each optionally
followed by ``:PATH`` inside the snapshot.

The repository part is everything before the first ``#``. A PATH loses its leading
slashes (``:/`` is the root) and keeps one trailing slash if it has any: as in POSIX,
``dir/`` must name a directory, and ``cafs.tree.resolve`` refuses a file there.

A name that cannot be a ref is the user's mistake (``UsageError``, exit 2); a valid name
the repository does not hold is ``RefError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cafs.errors import ListingUnavailable, RefError, UsageError
from cafs.format.journal import Snapshot, check_ref_name
from cafs.repository import Repository
from cafs.stores.access import redact

_HEX = re.compile(r"[0-9a-f]{8,64}")
_JID = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit also takes "²" (int() refuses it) and "١"


@dataclass(frozen=True)
class SnapshotSpec:
    repo: str
    selector: str
    path: bytes = b""


def parse_spec(text: str, *, need_snapshot: bool = True) -> SnapshotSpec:
    repo, sep, rest = text.partition("#")
    if not repo:
        raise UsageError(f"{text!r}: expected REPO#NAME[@JID][:PATH]")
    if not sep:
        if need_snapshot:
            raise UsageError(f"{text!r}: name a snapshot as REPO#NAME, REPO#NAME@JID or REPO#ROOTID")
        return SnapshotSpec(repo, "")
    selector, _, path = rest.partition(":")
    if not selector:
        raise UsageError(f"{text!r}: empty snapshot name after '#'")
    return SnapshotSpec(repo, selector, snapshot_path(path.encode("utf-8", "surrogateescape")))


def snapshot_path(path: bytes) -> bytes:
    """``path`` relative to the snapshot's root, with one trailing slash if it had any
    (``b"a/f/"`` must name a directory); the root is ``b""`` however it is written."""
    inner = path.strip(b"/")
    return inner + b"/" if inner and path.endswith(b"/") else inner


def ref_name(text: str) -> str:
    """``text`` if it can name a ref, else ``UsageError`` saying what a name may hold."""
    try:
        return check_ref_name(text)
    except RefError as exc:
        raise UsageError(str(exc)) from None


def find_snapshot(repo: Repository, selector: str) -> Snapshot:
    name, at, jid_text = selector.partition("@")
    if at:
        if not _JID.fullmatch(jid_text):
            raise UsageError(f"{selector!r}: the journal id after '@' must be a number")
        return repo.snapshot(ref_name(name), int(jid_text))
    if _HEX.fullmatch(selector):
        try:
            return _by_root_id(repo, selector)
        except ListingUnavailable:
            pass  # no listing, no search by root id: it can only be a ref name
    return repo.snapshot(ref_name(selector))


def _by_root_id(repo: Repository, selector: str) -> Snapshot:
    """The snapshot whose root id starts with ``selector``, else the ref of that name;
    a selector that is both names nothing (it says so) rather than the one found first."""
    matches = {s.root_id: s for s in repo.snapshots() if s.root_id.hex().startswith(selector)}
    if matches and selector in repo.ref_names():
        raise RefError(f"{selector!r} in {repo.url} is both a ref and the start of a snapshot's root id: "
                       f"name the ref's snapshot as {selector}@JID, or give more digits of the root id")
    if len(matches) == 1:
        return next(iter(matches.values()))
    if len(matches) > 1:
        raise RefError(f"root id prefix {selector!r} is ambiguous in {repo.url}")
    if selector not in repo.ref_names():
        raise RefError(f"{repo.url}: no snapshot with root id {selector!r} and no ref of that name")
    return repo.snapshot(check_ref_name(selector))


def recorded_source(source: str) -> str:
    """A source as recorded for later use (the mount's ``user.cafs.source``, the cache's
    list of snapshots): usable from any working directory (a local repository as an
    absolute path) and without user information in a URL."""
    repo, sep, rest = source.partition("#")
    return recorded_repo(repo) + sep + rest


def recorded_repo(repo: str) -> str:
    """A repository location as ``recorded_source`` records it."""
    return redact(repo) if "://" in repo else str(Path(repo).absolute())


def recorded_snapshot(repo: str, snap: Snapshot) -> str:
    """``REPO#REF@JID`` of a snapshot found in ``repo``, recorded as ``recorded_source`` does."""
    return f"{recorded_repo(repo)}#{snap.ref}@{snap.jid}"

"""Checking a repository (``cafs fsck``): find every fault and say what it affects.

What is checked, in order:

1. the config (by opening the repository) and every ref's journal entries;
2. every pack's trailer (one ranged read of its tail), and that index objects agree with
   the packs (a pack an index names but the store lacks, or of another length, or whose
   objects its trailer lists otherwise);
3. every node reachable from every snapshot: it exists where its location says (the
   pack exists, the range lies inside it, the trailer lists that object there) or, if
   gc repacked that pack, in another pack with the same stored bytes; it decodes, and it
   matches its id; it is of the kind its place needs (a directory's node or page, a
   file's node), agrees with the entry naming it (a directory's entry count, a file's
   size) and with its directory index (each page's count and first name, in name
   order); every file span likewise, without reading its bytes;
4. with ``read_fraction`` > 0: the bytes of every chunk (or a random fraction of packs),
   read pack by pack in one pass each, decoded and matched against their ids, and each
   pack's body digest;
5. each ref's ``latest`` pointer: that it leads a reader that cannot list keys to the
   ref's newest entry;
6. packs that no snapshot references (reported, not an error), only once every snapshot
   was walked whole: while a node or journal entry is unreadable, the packs only it
   references look unreferenced, so the report says it cannot tell (``None``) unless
   every pack is referenced already.

A problem names the object and what it affects: the snapshots and paths (the first few)
that lose bytes. Repair (``repair.py``) works from this report. Nothing here writes.

``Checker.run`` may be called again after a repair: it checks the repository as it is
then (listings, trailers of new or resized packs, indexes, journals, every snapshot
walked again), but does not fetch again a node it has verified, reread the trailer of a
pack of the same id and length, or reread with ``read_fraction`` a pack whose every
byte it has verified: ids name immutable bytes. So a second run costs what the first
could not reach, which a repaired metadata pack makes readable.

A store that keeps failing (``StoreUnavailable``: 5xx answers, resets, timeouts until
the deadline) tells nothing about the repository: the check stops with that error, which
``cafs fsck`` reports as operational (exit 8), rather than calling a pack, node, index or
journal entry it could not read damaged, which a repair would then act on. Other store
errors (a range past the end, access denied to one object) are the object's problem.

Caveats: that trust is in what this process verified; damage done to those objects
between two runs of one ``Checker`` is seen by the next ``cafs fsck``, not by that run.
"""

from __future__ import annotations

import random
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

from cafs.errors import CafsError, FormatError, IntegrityError, ObjectNotFound, StoreError, StoreUnavailable
from cafs.format.index import PackSummary, decode_index
from cafs.format.journal import (
    Snapshot, decode_latest, decode_snapshot, is_ref_name, journal_key, latest_key, parse_jid,
)
from cafs.format.location import Location, verify_stored
from cafs.format.nodes import DirIndexNode, Entry, FileNode, Node, TreeNode, decode_node
from cafs.format.pack import PackTrailer, trailer_of
from cafs.ids import digest
from cafs.metacache import DecodedNodes
from cafs.repository import Repository
from cafs.tree import depth_first

MAX_PATHS_PER_PROBLEM = 5
READ_THREADS = 2


class _VerifiedNodes:
    """The nodes a checker verified, by id: kept as their plain bytes, and decoded again
    when walked again once they fell out of a bounded set of decoded nodes
    (``DecodedNodes``). Kept decoded, the nodes of a whole repository took some 600 bytes
    per entry, five times their bytes (6 GB for ten million files). Reading and verifying
    a node is still done once; walking the snapshots of one ref may decode it again."""

    def __init__(self) -> None:
        self._bytes: dict[bytes, bytes] = {}
        self._decoded = DecodedNodes()

    def __contains__(self, node_id: bytes) -> bool:
        return node_id in self._bytes

    def add(self, node_id: bytes, data: bytes) -> Node:
        """The node of the verified bytes ``data``, kept if it decodes (else FormatError)."""
        node = self._decode(node_id, data)
        self._bytes[node_id] = data
        return node

    def get(self, node_id: bytes) -> Node | None:
        node = self._decoded.get(node_id)
        if node is not None:
            return node
        data = self._bytes.get(node_id)
        return None if data is None else self._decode(node_id, data)

    def _decode(self, node_id: bytes, data: bytes) -> Node:
        node = decode_node(data, f"node {node_id.hex()[:16]}")
        self._decoded.put(node_id, node)
        return node


@dataclass
class Problem:
    kind: str  # missing-pack, truncated-pack, corrupt-pack, corrupt-chunk, missing-object, corrupt-node, bad-node, bad-journal, bad-index, bad-latest
    subject: str  # the object: a pack id, a chunk id, a journal key
    detail: str
    pack: bytes | None = None  # the pack to fetch again to repair it, if any
    affects: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> paths

    def affect(self, snapshot: str, path: str) -> None:
        """Name ``path`` of ``snapshot`` as affected, once: a file's spans are walked one
        after another, so the same file comes again only right after itself."""
        paths = self.affects.setdefault(snapshot, [])
        if not paths or paths[-1] != path:
            paths.append(path)

    def describe(self) -> str:
        line = f"{self.kind} {self.subject}: {self.detail}"
        for snap, paths in sorted(self.affects.items()):
            shown = ", ".join(paths[:MAX_PATHS_PER_PROBLEM])
            more = f" (+{len(paths) - MAX_PATHS_PER_PROBLEM} more)" if len(paths) > MAX_PATHS_PER_PROBLEM else ""
            line += f"\n    affects {snap}: {shown}{more}"
        return line


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    nodes: int = 0
    chunks: int = 0
    bytes_read: int = 0
    # packs (hex) no snapshot references; None when that cannot be told: some snapshot was
    # not walked whole (``unreadable_snapshots``) and some pack is not referenced by what was
    unreferenced_packs: list[str] | None = field(default_factory=list)
    unreadable_snapshots: list[str] = field(default_factory=list)  # ref@jid whose tree could not be read whole

    @property
    def clean(self) -> bool:
        return not self.problems


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "/"


class Checker:
    def __init__(self, repo: Repository, *, progress: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self.progress = progress or (lambda _msg: None)
        # What this Checker verified, kept across runs (see the module docstring).
        self._nodes_ok = _VerifiedNodes()
        self._summaries: dict[bytes, PackSummary] = {}  # pack id -> its trailer, read whole
        self._read_ok: set[bytes] = set()  # packs whose every byte matched (read_fraction)
        self._start()

    def _start(self) -> None:
        """State of one run."""
        self.report = Report()
        self.sizes: dict[bytes, int] = {}
        self.trailers: dict[bytes, PackTrailer] = {}
        self._by_pack_offset: dict[bytes, dict[int, Location]] = {}
        self._by_id: dict[bytes, Location] = {}
        self._pack_problem: dict[bytes, Problem] = {}
        self._object_problem: dict[bytes, Problem] = {}
        self._bad_nodes: dict[tuple[bytes, str], Problem] = {}  # (node id, what is wrong) -> its problem
        self._nodes_seen: set[bytes] = set()  # nodes counted in this run's report
        self._referenced_packs: set[bytes] = set()
        self._unreadable: set[str] = set()
        self._listed_jids: dict[str, list[int]] = defaultdict(list)  # ref -> jids of its listed entries
        self._set_aside: set[str] | None = None  # packs fsck --repair set aside (damaged/), listed on demand
        self._snapshots: list[Snapshot] = []  # those whose journal entries decode

    def run(self, read_fraction: float = 0.0, seed: int | None = None) -> Report:
        self._start()
        self._check_packs()
        self._check_indexes()
        self._snapshots = self._journals()
        for snap in self._snapshots:
            self._check_snapshot(snap)
        self._check_latest()
        if read_fraction > 0:
            self._read_data(read_fraction, random.Random(seed))
        unreferenced = sorted(p.hex() for p in self.sizes if p not in self._referenced_packs)
        self.report.unreadable_snapshots = sorted(self._unreadable)
        # A snapshot not walked whole may reference any pack not referenced so far.
        self.report.unreferenced_packs = None if self._unreadable and unreferenced else unreferenced
        return self.report

    # -- packs and indexes ---------------------------------------------------------------

    def _problem(self, p: Problem) -> Problem:
        self.report.problems.append(p)
        return p

    def _check_packs(self) -> None:
        self.sizes = self.repo.list_packs()
        self.report.packs = len(self.sizes)
        for n, (pack_id, size) in enumerate(sorted(self.sizes.items())):
            self.progress(f"pack trailers {n + 1}/{len(self.sizes)}")
            summary = self._summaries.get(pack_id)
            if summary is None or summary.length != size:
                try:
                    summary = self._summaries[pack_id] = self.repo.read_trailer(pack_id, size)
                except StoreUnavailable:
                    raise  # the store failed until the deadline: no finding about the repository
                except (FormatError, StoreError) as exc:
                    kind = "truncated-pack" if "magic" in str(exc) or "exceeds" in str(exc) else "corrupt-pack"
                    self._pack_problem[pack_id] = self._problem(
                        Problem(kind, pack_id.hex(), str(exc), pack=pack_id))
                    continue
            trailer = PackTrailer(summary.kind, b"", summary.entries)
            self.trailers[pack_id] = trailer
            self._by_pack_offset[pack_id] = {loc.offset: loc for loc in summary.entries}
            for loc in summary.entries:
                self._by_id.setdefault(loc.id, loc)

    def _check_indexes(self) -> None:
        for key, _size in self.repo.store.list("index/"):
            try:
                data = self.repo.store.get(key)
                if digest(data).hex() != key.rsplit("/", 1)[-1]:
                    raise IntegrityError("content does not match its name")
                packs = decode_index(data, key)
            except StoreUnavailable:
                raise  # no finding (see the module docstring)
            except (FormatError, IntegrityError, StoreError) as exc:
                self._problem(Problem("bad-index", key, f"{exc} (an index is a cache of pack trailers; "
                                      "repair rewrites it)"))
                continue
            disagrees = False  # one problem per index object
            for p in packs:
                size = self.sizes.get(p.pack_id)
                if size is None and p.pack_id not in self._pack_problem:
                    self._pack_problem[p.pack_id] = self._problem(Problem(
                        "missing-pack", p.pack_id.hex(), f"listed by {key} but not in the store", pack=p.pack_id))
                elif size is not None and size != p.length and p.pack_id not in self._pack_problem:
                    self._pack_problem[p.pack_id] = self._problem(Problem(
                        "truncated-pack", p.pack_id.hex(), f"is {size} bytes, {key} says {p.length}", pack=p.pack_id))
                elif size == p.length and not disagrees and (why := self._disagrees(p)) is not None:
                    # an import deduplicates against what the index says: a chunk it
                    # places wrongly would be a span of the next snapshot that reads nothing
                    disagrees = True
                    self._problem(Problem("bad-index", key, f"{why} (an index is a cache of pack trailers; "
                                          "repair rewrites it)"))

    def _disagrees(self, listed: PackSummary) -> str | None:
        """Why an index's summary of a pack is not what the pack's trailer says, or None
        (also when the trailer cannot be read: that pack's own problem is reported)."""
        trailer = self.trailers.get(listed.pack_id)
        if trailer is None:
            return None
        what = f"pack {listed.pack_id.hex()[:16]}"
        if listed.kind != trailer.kind:
            return f"says {what} is of kind {listed.kind}, its trailer {trailer.kind}"
        extra = set(listed.entries) - set(trailer.entries)
        if extra:
            loc = min(extra, key=lambda e: e.offset)
            return (f"lists {len(extra)} object(s) {what}'s trailer does not, such as "
                    f"{loc.id.hex()[:16]} at offset {loc.offset}")
        if len(listed.entries) != len(trailer.entries):
            return f"lists {len(listed.entries)} object(s) in {what}, its trailer {len(trailer.entries)}"
        return None

    # -- snapshots -----------------------------------------------------------------------

    def _journals(self) -> list[Snapshot]:
        snaps = []
        for key, _size in self.repo.store.list("refs/"):
            parts = key.split("/")
            jid = parse_jid(parts[-1]) if len(parts) == 3 else None
            if jid is None:
                continue
            if not is_ref_name(parts[1]):
                # put there by hand or by another tool; every other command skips it (ref_names)
                self._problem(Problem("bad-journal", key, f"not a journal entry: no ref may be named {parts[1]!r}, "
                                      "so cafs never wrote it and nothing reads it; remove it"))
                continue
            self._listed_jids[parts[1]].append(jid)
            try:
                snaps.append(decode_snapshot(self.repo.store.get(journal_key(parts[1], jid)), parts[1], jid))
            except StoreUnavailable:
                raise  # no finding (see the module docstring)
            except (CafsError, StoreError) as exc:
                self._unreadable.add(f"{parts[1]}@{jid}")
                self._problem(Problem("bad-journal", key, str(exc),
                                      affects={f"{parts[1]}@{jid}": ["/ (the whole snapshot)"]}))
        self.report.snapshots = len(snaps)
        return sorted(snaps, key=lambda s: (s.ref, s.jid))

    def _check_latest(self) -> None:
        """Each ref's ``latest`` pointer must lead a reader that cannot list keys to the
        newest entry: no pointer is fine (repositories older than pointers), one that
        names a jid the ref lacks, or stops short of the newest at a gap, is not: no
        commit mends it, since a commit only ever advances the pointer."""
        for name, jids in sorted(self._listed_jids.items()):
            key = latest_key(name)
            try:
                pointer = decode_latest(self.repo.store.get(key))
            except ObjectNotFound:
                continue
            except StoreUnavailable:
                raise  # no finding (see the module docstring)
            except StoreError as exc:
                self._problem(Problem("bad-latest", key, f"cannot be read: {exc}"))
                continue
            try:
                found = self.repo.jids_after_latest(name)
            except StoreUnavailable:
                raise  # no finding (see the module docstring)
            except StoreError as exc:
                self._problem(Problem("bad-latest", key, f"the entries after it cannot be probed: {exc}"))
                continue
            newest = max(jids)
            if found and found[-1] >= newest:  # (beyond it: a commit since the listing)
                continue
            said = "is not a jid" if pointer is None else f"says {pointer}"
            sees = f"snapshots up to {name}@{found[-1]} only" if found else f"no snapshot of {name}"
            self._problem(Problem("bad-latest", key, f"{said}: a reader that cannot list keys (a web server "
                                  f"without directory listings) finds {sees}, the newest being {name}@{newest} "
                                  "(an advisory pointer; repair rewrites it)"))

    def _locate(self, loc: Location) -> Problem | None:
        """None if ``loc`` names an object that the pack holds there; else its problem."""
        self._referenced_packs.add(loc.pack)
        if loc.pack in self._pack_problem:
            return self._pack_problem[loc.pack]
        moved = self._by_id.get(loc.id)
        if loc.pack not in self.sizes and moved is not None and moved.length == loc.length:
            self._referenced_packs.add(moved.pack)  # repacked by gc: found by id, in any form (repository.py)
            return None
        if loc.pack not in self.sizes:
            p = self._problem(Problem("missing-pack", loc.pack.hex(), self._missing_detail(loc.pack), pack=loc.pack))
            self._pack_problem[loc.pack] = p
            return p
        listed = self._by_pack_offset.get(loc.pack, {}).get(loc.offset)
        if listed is None or listed.id != loc.id or listed.stored_length != loc.stored_length:
            if loc.id not in self._object_problem:
                self._object_problem[loc.id] = self._problem(Problem(
                    "missing-object", loc.id.hex(), f"not in pack {loc.pack.hex()[:16]} at offset {loc.offset}",
                    pack=loc.pack))
            return self._object_problem[loc.id]
        return None

    def _missing_detail(self, pack_id: bytes) -> str:
        if self._set_aside is None:
            try:
                self._set_aside = {key.rsplit("/", 1)[-1] for key, _ in self.repo.store.list("damaged/")}
            except StoreUnavailable:
                raise  # no finding (see the module docstring)
            except (CafsError, StoreError):
                self._set_aside = set()
        if pack_id.hex() in self._set_aside:
            return (f"referenced but not in the store: fsck --repair set it aside as damaged/{pack_id.hex()}; "
                    "`cafs import --reread` of the same data stores its lost objects again")
        return "referenced but not in the store"

    def _check_snapshot(self, snap: Snapshot) -> None:
        label = f"{snap.ref}@{snap.jid}"
        self.progress(f"snapshot {label}")
        for path, spans in _files(snap.root, lambda d, path: self._dir_entries(d, label, path),
                                  lambda entry, path: self._file_spans(entry, label, path)):
            for span in spans:
                self.report.chunks += 1
                problem = self._locate(span)
                if problem is not None:
                    problem.affect(label, _show(path))

    def _node(self, loc: Location, label: str, path: bytes) -> TreeNode | DirIndexNode | FileNode | None:
        # Snapshots of one ref share most of their nodes: each is read and verified once,
        # but walked again for every snapshot so problems name every snapshot they affect.
        problem = self._locate(loc)
        if problem is None:
            node = self._nodes_ok.get(loc.id)
            if node is None:
                try:
                    node = self._nodes_ok.add(loc.id, self.repo.read_object(loc))
                except StoreUnavailable:
                    raise  # no finding (see the module docstring)
                except (FormatError, IntegrityError, StoreError) as exc:
                    problem = self._object_problem.get(loc.id) or self._problem(
                        Problem("corrupt-node", loc.id.hex(), str(exc), pack=loc.pack))
                    self._object_problem[loc.id] = problem
            if node is not None:
                if loc.id not in self._nodes_seen:
                    self._nodes_seen.add(loc.id)
                    self.report.nodes += 1
                return node
        assert problem is not None
        problem.affect(label, _show(path) + " (and everything below)")
        self._unreadable.add(label)
        return None

    def _dir_entries(self, d: Entry, label: str, path: bytes) -> list[Entry]:
        """The entries of directory ``d``, as far as they can be read; a node that
        verifies but is no directory's, or disagrees with its index or with ``d``, is a
        problem (``bad-node``), which readers of the snapshot meet as an error."""
        assert d.ref is not None
        node = self._node(d.ref, label, path)
        if node is None:
            return []
        if isinstance(node, FileNode):
            self._bad_node(d.ref, label, _show(path) + " (and everything below)",
                           "is a file node where a directory's node belongs", walked=False)
            return []
        complete = True
        if isinstance(node, TreeNode):
            out = list(node.entries)
        else:
            out = []
            for page in node.pages:
                sub = self._node(page.ref, label, path)
                if sub is None:  # a problem already, naming this directory
                    complete = False
                    continue
                if not isinstance(sub, TreeNode):
                    self._bad_node(page.ref, label, _show(path) + " (and everything below)",
                                   "is no tree node, but a page of a directory", walked=False)
                    complete = False
                    continue
                if len(sub.entries) != page.count or sub.names[0] != page.first_name:
                    first = sub.names[0][:80] if sub.names else b""
                    self._bad_node(page.ref, label, _show(path), f"is a directory page of {len(sub.entries)} entries "
                                   f"from {first!r}; its index says {page.count} from {page.first_name[:80]!r}")
                elif out and not out[-1].name < sub.names[0]:
                    self._bad_node(page.ref, label, _show(path), "is a directory page whose names do not follow the "
                                   "previous page's")
                out.extend(sub.entries)
        if complete and len(out) != d.size:
            self._bad_node(d.ref, label, _show(path), f"holds {len(out)} entries, its directory's entry says {d.size}")
        return out

    def _file_spans(self, entry: Entry, label: str, path: bytes) -> tuple[Location, ...]:
        if entry.spans is not None:
            return entry.spans
        assert entry.ref is not None
        node = self._node(entry.ref, label, path)
        if node is None:
            return ()
        if not isinstance(node, FileNode):
            self._bad_node(entry.ref, label, _show(path), "is a directory node where a file's spans belong",
                           walked=False)
            return ()
        if (total := sum(s.length for s in node.spans)) != entry.size:
            self._bad_node(entry.ref, label, _show(path), f"holds spans of {total} bytes, its file's entry says "
                           f"{entry.size}")
        return node.spans

    def _bad_node(self, loc: Location, label: str, shown: str, why: str, *, walked: bool = True) -> None:
        """Report node ``loc``, which verified, as not fitting where the path ``shown`` of
        snapshot ``label`` has it; unless ``walked``, what it references was not walked."""
        problem = self._bad_nodes.get((loc.id, why))
        if problem is None:
            problem = self._bad_nodes[loc.id, why] = self._problem(Problem(
                "bad-node", loc.id.hex(), f"{why}: not a snapshot cafs wrote, and no copy of the node can differ "
                "(import the data again)"))
        problem.affect(label, shown)
        if not walked:
            self._unreadable.add(label)

    # -- data ------------------------------------------------------------------------------

    def _read_data(self, fraction: float, rng: random.Random) -> None:
        packs = sorted(self.trailers)
        if fraction < 1:
            packs = [p for p in packs if rng.random() < fraction]
        packs = [p for p in packs if p not in self._read_ok]  # verified whole by an earlier run
        # Reading and hashing release the GIL: two packs at a time keep the disk and both
        # cores busy. Results are recorded on this thread, in pack order.
        bad: dict[bytes, Problem] = {}  # chunk id -> the problem of the pack that fails it
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for n, (pack_id, outcome) in enumerate(zip(packs, pool.map(self._verify_pack, packs), strict=True)):
                self.progress(f"read {n + 1}/{len(packs)} packs")
                self._record_pack(pack_id, outcome, bad)
        if bad:
            self._name_chunk_users(bad)

    def _verify_pack(self, pack_id: bytes) -> tuple[int, list[Location], int, bool] | CafsError:
        """(bytes read, objects that fail, objects in all, body digest ok), or the error.
        A pack that fails is read again (``Repository.read_pack``) and reported as the
        last read found it: a byte flipped on the way is no damage of the repository."""
        failed: list[tuple[int, list[Location], int, bool]] = []

        def check(data: bytes) -> tuple[int, list[Location], int, bool]:
            outcome = _verify_pack_bytes(pack_id, data)
            if outcome[1] or not outcome[3]:
                failed.append(outcome)
                raise IntegrityError(f"pack {pack_id.hex()}: fails verification")
            return outcome

        try:
            return self.repo.read_pack(pack_id, check)
        except IntegrityError as exc:
            return failed[-1] if failed else exc
        except StoreUnavailable:
            raise  # no finding (see the module docstring)
        except (StoreError, FormatError) as exc:
            return exc

    def _record_pack(self, pack_id: bytes, outcome: tuple[int, list[Location], int, bool] | CafsError,
                     bad_chunks: dict[bytes, Problem]) -> None:
        """Report what reading ``pack_id`` whole found; its chunks that fail go into
        ``bad_chunks``, whose users ``_name_chunk_users`` names once every pack is read."""
        if isinstance(outcome, CafsError):
            self._problem(Problem("corrupt-pack", pack_id.hex(), f"cannot read: {outcome}", pack=pack_id))
            return
        length, bad, total, body_ok = outcome
        self.report.bytes_read += length
        if not bad and body_ok:
            self._read_ok.add(pack_id)
            return
        problem = self._problem(Problem(
            "corrupt-pack", pack_id.hex(),
            f"{len(bad)} of {total} objects do not match their ids"
            + ("" if body_ok else "; body digest differs"), pack=pack_id))
        for loc in bad:
            if loc.id in self._nodes_ok:
                problem.affect("(metadata)", f"node {loc.id.hex()[:16]}")
            else:
                bad_chunks.setdefault(loc.id, problem)

    def _name_chunk_users(self, bad: dict[bytes, Problem]) -> None:
        """Name in each problem of ``bad`` (chunk id -> problem) the first few files that
        hold that chunk (``MAX_PATHS_PER_PROBLEM`` spans of it), walking the snapshots
        again over the nodes verified. Found now, for the few chunks that fail: noting
        the first users of every chunk while checking held a path per chunk of the
        repository in memory (gigabytes for tens of millions of files)."""
        left = dict.fromkeys(bad, MAX_PATHS_PER_PROBLEM)  # spans of each chunk still to name
        to_name = len(left) * MAX_PATHS_PER_PROBLEM
        for snap in self._snapshots:
            label = f"{snap.ref}@{snap.jid}"
            for path, spans in _files(snap.root, self._verified_entries, self._verified_spans):
                for span in spans:
                    if left.get(span.id, 0) > 0 and self._locate(span) is None:
                        left[span.id] -= 1
                        to_name -= 1
                        bad[span.id].affect(label, _show(path))
                if not to_name:
                    return

    def _verified_entries(self, d: Entry, _path: bytes) -> list[Entry]:
        assert d.ref is not None
        return self._verified_node_entries(d.ref)

    def _verified_node_entries(self, loc: Location) -> list[Entry]:
        node = self._nodes_ok.get(loc.id)
        if isinstance(node, TreeNode):
            return list(node.entries)
        if isinstance(node, DirIndexNode):
            return [e for page in node.pages for e in self._verified_node_entries(page.ref)]
        return []

    def _verified_spans(self, entry: Entry, _path: bytes) -> tuple[Location, ...]:
        if entry.spans is not None:
            return entry.spans
        assert entry.ref is not None
        node = self._nodes_ok.get(entry.ref.id)
        return node.spans if isinstance(node, FileNode) else ()


def _files(root: Entry, entries_of: Callable[[Entry, bytes], list[Entry]],
           spans_of: Callable[[Entry, bytes], tuple[Location, ...]]) -> Iterator[tuple[bytes, tuple[Location, ...]]]:
    """``(path, spans)`` of every file below the directory ``root``, depth first, the
    entries of a directory in reverse name order; the entries of a directory (by its
    entry and its path) and the spans of a file as the callables give them.
    Holds one path, of the directory being walked (``cafs.tree.depth_first``)."""
    assert root.ref is not None

    def below(entry: Entry, path: bytes) -> Iterator[Entry] | None:
        if not entry.is_dir:
            return None
        return reversed(entries_of(entry, path))

    for path, entry in depth_first(reversed(entries_of(root, b"")), b"", lambda e: e.name, below):
        if entry.is_file:
            yield path, spans_of(entry, path)


def _verify_pack_bytes(pack_id: bytes, data: bytes) -> tuple[int, list[Location], int, bool]:
    """(length, objects that fail, objects in all, body digest ok) of a whole pack's
    bytes; FormatError if its trailer does not decode."""
    trailer = trailer_of(data, pack_id, f"pack {pack_id.hex()}")
    view = memoryview(data)
    bad = []
    for loc in trailer.entries:
        try:
            verify_stored(loc, view[loc.offset:loc.end])
        except IntegrityError:
            bad.append(loc)
    body_ok = digest(view[:trailer.body_length]) == trailer.body_digest
    return len(data), bad, len(trailer.entries), body_ok

"""The ``cafs`` command: parse arguments, call the library, map errors to exit codes.

Exit codes (one place, ``main``): 0 success; 1 an error, reported as one line naming the
thing; 2 bad usage; 3 an import committed its snapshot but skipped paths (listed on
stderr); 130 interrupted (Ctrl-C); 143 and 129 stopped by SIGTERM and SIGHUP, which end a
command through its clean-up as Ctrl-C does (its repository lock released). A reader of standard output that goes away is no error: the
command stops writing and exits with the code it would have given (an fsck's verdict, an
import's 3), or 0 when its output was its work (``cafs cat | head``). Long work shows
progress on a terminal only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import stat
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator, Sequence

from cafs import sizes
from cafs.errors import CafsError, NoSpaceError, OtherRepository, RefError, RepositoryError, UsageError
from cafs.fileio import CWD_GONE, cwd_gone, raise_open_files_limit
from cafs.format.config import ChunkerParams, RepoConfig, check_config
from cafs.format.journal import Snapshot
from cafs.metacache import MetaCache, NodeReader, default_cache_dir
from cafs.mountopts import MAX_TIMEOUT, OPTIONS_HELP
from cafs.naming import find_snapshot, parse_spec, recorded_snapshot, ref_name, snapshot_path
from cafs.progress import Progress, TreeTotals, human_bytes, human_duration
from cafs.repository import Repository, same_repository
from cafs.sources import DEFAULT_DEADLINE
from cafs.stores import open_store
from cafs.tree import show_path

if TYPE_CHECKING:
    from cafs.format.nodes import Entry
    from cafs.importer import ImportResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130
STATS_TIMEOUT = 10.0  # seconds `cafs stats MOUNTPOINT` waits for the mount's daemon
GC_EVERY = 10_000  # new objects between two passes of the cycle collector (see _fewer_collections)
TERMINATIONS = (signal.SIGTERM, signal.SIGHUP)  # end a command as Ctrl-C does (_terminations_as_interrupts)
REDELIVER = 0.05  # seconds before an interrupt a finalizer swallowed is delivered again (_interrupts_kept)

def parse_size(text: str) -> int:
    try:
        return sizes.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_seconds(text: str) -> float:
    """``--timeout``: seconds, above 0 and at most a day (nan and inf broke the wait with
    a traceback; 0 or less reported a healthy mount as hung)."""
    try:
        return sizes.parse_seconds(text, MAX_TIMEOUT)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds, above 0 and at most {MAX_TIMEOUT:.0f}") from None


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def local_path(text: str, what: str, instead: str) -> Path:
    """``text`` as a local path; a URL is a ``UsageError`` (``Path`` would take
    ``s3://bucket/x`` for the directory ``s3:/bucket/x`` below the current one)."""
    if _URL.match(text):
        raise UsageError(f"{what} {text}: a URL; {what} is a local path ({instead})")
    return Path(text)


def add_read_mirrors(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--mirror", dest="source_mirrors", action="append", default=[], metavar="URL",
                    help="a mirror of the repository, read when its own store fails (repeatable)")


def store_deadline(env: dict[str, str]) -> float:
    """``CAFS_TIMEOUT``: seconds a store operation may take, retries included."""
    text = env.get("CAFS_TIMEOUT")
    if not text:
        return DEFAULT_DEADLINE
    try:
        return sizes.parse_seconds(text)
    except ValueError:
        raise UsageError(f"CAFS_TIMEOUT={text!r}: a number of seconds above 0") from None


# -- context shared by the commands ----------------------------------------------------


class Context:
    def __init__(self, args: argparse.Namespace) -> None:
        self.cache_dir = Path(args.cache) if getattr(args, "cache", None) else default_cache_dir(dict(os.environ))
        self._meta: dict[str, MetaCache] = {}
        self._mirrors: list[str] = getattr(args, "source_mirrors", [])
        self.deadline = store_deadline(dict(os.environ))

    def add_mirrors(self, urls: Sequence[str]) -> None:
        """Read from these mirrors too (after those given on the command line)."""
        self._mirrors = [*self._mirrors, *(u for u in urls if u not in self._mirrors)]

    def repo(self, location: str) -> Repository:
        return Repository.at(location, mirrors=self._mirrors, deadline=self.deadline)

    def meta(self, repo: Repository) -> MetaCache:
        return self.meta_at(repo.config.repo_id)

    def meta_at(self, repo_id: str) -> MetaCache:
        """The metadata cache of repository ``repo_id`` (one LMDB environment per
        repository per process: LMDB forbids opening one twice in a process)."""
        if repo_id not in self._meta:
            self._meta[repo_id] = MetaCache.open_mending(self.cache_dir / repo_id)
        return self._meta[repo_id]

    def reader(self, repo: Repository) -> NodeReader:
        return NodeReader(repo, self.meta(repo))

    def close(self) -> None:
        for m in self._meta.values():
            m.close()

    def snapshot(self, text: str) -> tuple[Repository, Snapshot, bytes]:
        spec = parse_spec(text)
        repo = self.repo(spec.repo)
        return repo, find_snapshot(repo, spec.selector), spec.path


# -- commands ---------------------------------------------------------------------------


def cmd_init(ctx: Context, args: argparse.Namespace) -> int:
    defaults = RepoConfig("0" * 64)

    def given(value: int | None, default: int) -> int:
        return default if value is None else value  # 0 is given, and refused by check_config

    chunker = ChunkerParams(given(args.chunk_min, defaults.chunker.min_size),
                            given(args.chunk_avg, defaults.chunker.avg_size),
                            given(args.chunk_max, defaults.chunker.max_size))
    pack_size = given(args.pack_size, defaults.pack_size)
    try:
        check_config(RepoConfig(defaults.repo_id, chunker, pack_size))
    except RepositoryError as exc:
        raise UsageError(str(exc)) from None
    repo = Repository.init(open_store(args.repo, deadline=ctx.deadline), chunker, pack_size, deadline=ctx.deadline)
    c = repo.config
    print(f"created cafs repository {repo.url} (id {c.repo_id[:12]}, chunks "
          f"{human_bytes(c.chunker.min_size)}/{human_bytes(c.chunker.avg_size)}/{human_bytes(c.chunker.max_size)}, "
          f"packs {human_bytes(c.pack_size)})")
    root = repo.local_root
    if root is not None and "#" in str(root):
        print(f"note: '#' begins the snapshot in REPO#NAME; name this repository {root.as_uri()}", file=sys.stderr)
    return EXIT_OK


@contextmanager
def _reader_may_leave() -> Iterator[None]:
    """Around the report of a command whose exit code says more than "done" (an fsck's
    verdict, an import's skipped paths, a prefetch's failed chunks): a reader that goes
    away (``cafs fsck REPO | head``) ends the report, not the command, nor its code.
    Standard output is flushed here, where a closed pipe is met."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()


def cmd_import(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.importer import run_import
    ref_name(args.name)
    if not args.dir:  # Path("") is the current directory
        raise UsageError("empty DIR: name the directory to import")
    src = local_path(args.dir, "DIR", "import reads a directory of this host; cafs copy copies between repositories")
    repo = ctx.repo(args.repo)
    counters: list[Any] = []
    show = sys.stderr.isatty() and not args.no_progress
    totals = TreeTotals().start(str(src)) if show else None

    def render(elapsed: float) -> str:
        if not counters:
            return "reading the repository index..."
        c = counters[0]
        rate = c.read_bytes / elapsed if elapsed > 0 else 0
        line = f"{c.files} files, {human_bytes(c.logical)}, {human_bytes(rate)}/s"
        if totals is not None and totals.done and totals.bytes:
            left = max(0, totals.bytes - c.logical)
            eta = left / rate if rate > 0 else 0
            line += f", {100 * min(c.logical, totals.bytes) / totals.bytes:.0f}% of {human_bytes(totals.bytes)}, ETA {human_duration(eta)}"
        return line + f"  {show_path(c.current)}"

    def warn(msg: str) -> None:
        print(f"cafs: warning: {msg}", file=sys.stderr)

    with Progress(render, enabled=show):
        result = run_import(repo, ctx.meta(repo), src, args.name, strict=args.strict, reread=args.reread,
                            counters_out=counters, on_problem=warn)
    with _reader_may_leave():
        _print_import_summary(result)
    for s in result.left_out:
        print(f"cafs: note: left out {s.describe()}", file=sys.stderr)
    if result.skipped:
        print(f"cafs: {len(result.skipped)} path(s) skipped:", file=sys.stderr)
        for s in result.skipped:
            print(f"  {s.describe()}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def _print_import_summary(r: ImportResult) -> None:
    c = r.counters
    snap = r.snapshot
    assert snap is not None
    rate = c.read_bytes / r.seconds if r.seconds > 0 else 0.0
    # of the bytes cut into chunks (read, or holes), how many were new: unchanged files
    # do not inflate it
    dedup = (c.read_bytes + c.hole_bytes) / c.new_bytes if c.new_bytes else 1.0
    print(f"snapshot {snap.ref}@{snap.jid} root {snap.root_id.hex()[:16]}")
    print(f"  files {c.files} ({c.reused_files} unchanged), directories {c.dirs}, symlinks {c.symlinks}, "
          f"skipped {len(r.skipped)}")
    holes = f" (and {human_bytes(c.hole_bytes)} of holes, not read)" if c.hole_bytes else ""
    print(f"  logical {human_bytes(c.logical)}, read {human_bytes(c.read_bytes)}{holes}, "
          f"new {human_bytes(c.new_bytes)}, stored {human_bytes(r.stored_bytes)} in {r.packs} pack(s)")
    print(f"  dedup ratio {dedup:.2f}x, time {r.seconds:.2f} s ({human_bytes(rate)}/s read)")


def cmd_snapshots(ctx: Context, args: argparse.Namespace) -> int:
    repo = ctx.repo(args.repo)
    snaps, damaged = repo.readable_snapshots(ref_name(args.name) if args.name else None)
    if args.name and not snaps and not damaged:  # a ref has a snapshot as long as it exists
        raise RefError(f"{repo.url}: no ref named {args.name!r}")
    code = _report_damaged_entries(damaged)
    if args.json:
        print(json.dumps([{"ref": s.ref, "jid": s.jid, "time_ns": s.time_ns, "root": s.root_id.hex(),
                           "host": s.host, "source": os.fsdecode(s.source), "stats": s.stats} for s in snaps], indent=2))
        return code
    if not snaps:
        print("no snapshots", file=sys.stderr)
        return code
    print(f"{'ref':<20} {'jid':>5}  {'time':<19}  {'root':<16}  {'files':>8}  {'size':>10}")
    for s in snaps:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.time_ns / 1e9))
        print(f"{s.ref:<20} {s.jid:>5}  {when}  {s.root_id.hex()[:16]}  {s.stats.get('files', 0):>8}  "
              f"{human_bytes(s.stats.get('bytes', 0)):>10}")
    return code


def _report_damaged_entries(damaged: list[str]) -> int:
    """Name each journal entry that does not decode on stderr; the exit code to give."""
    for line in damaged:
        print(f"cafs: {line}; `cafs fsck --repair --mirror URL` restores it from a mirror", file=sys.stderr)
    return EXIT_ERROR if damaged else EXIT_OK


def _ls_line(e: Entry, path: bytes) -> str:
    kind = {1: stat.S_IFDIR, 2: stat.S_IFREG, 3: stat.S_IFLNK}[e.kind]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime_ns // 1_000_000_000))
    line = f"{stat.filemode(kind | e.mode)} {e.uid:>5} {e.gid:>5} {e.size:>12} {when}  {show_path(path)}"
    if e.is_symlink:
        assert e.target is not None
        line += f" -> {show_path(e.target)}"
    return line


def cmd_ls(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.tree import list_dir, resolve, walk
    repo, snap, path = ctx.snapshot(args.snapshot)
    reader = ctx.reader(repo)
    entry = resolve(reader, snap.root, path)
    path = path.rstrip(b"/")  # a directory's (resolve saw to it) or a symlink's: shown by its name
    if args.recursive:
        for p, e in walk(reader, entry, path):
            if p != path or not e.is_dir:
                print(_ls_line(e, p))
    elif entry.is_dir:
        for e in list_dir(reader, entry):
            print(_ls_line(e, e.name))
    else:
        print(_ls_line(entry, path))
    return EXIT_OK


def cmd_cat(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.readahead import read_in_order
    from cafs.tree import file_spans, resolve
    repo, snap, path = ctx.snapshot(args.snapshot)
    reader = ctx.reader(repo)
    entry = resolve(reader, snap.root, path)
    if not entry.is_file:
        raise UsageError(f"{show_path(os.fsencode(args.snapshot))}: not a regular file")
    if sys.stdout is None:
        raise CafsError("standard output is closed: nowhere to write the file")
    out = sys.stdout.buffer
    for data in read_in_order(repo, file_spans(reader, entry)):
        out.write(data)
    out.flush()
    return EXIT_OK


def cmd_get(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.extract import Extractor
    from cafs.tree import resolve
    if not args.dest:
        raise UsageError("empty DEST: name the directory or file to extract to")
    dest = local_path(args.dest, "DEST", "cafs copy fills another repository")
    repo, snap, path = ctx.snapshot(args.snapshot)
    reader = ctx.reader(repo)
    entry = resolve(reader, snap.root, path)
    extractor = Extractor(repo, reader)
    c = extractor.counters
    started = time.monotonic()

    def render(elapsed: float) -> str:
        return (f"{c.files} files, {human_bytes(c.bytes_written)} written, "
                f"{human_bytes(c.bytes_kept)} already there, {human_bytes(c.bytes_written / max(elapsed, 1e-9))}/s")

    with Progress(render):
        try:
            extractor.extract(entry, dest, into=args.dest.endswith("/"))
        finally:
            extractor.close()
    links = f" ({c.links} of them hard links)" if c.links else ""
    print(f"{c.files} files{links}, {c.dirs} directories, {c.symlinks} symlinks; "
          f"{human_bytes(c.bytes_written)} written, {human_bytes(c.bytes_kept)} already correct; "
          f"{time.monotonic() - started:.2f} s", file=sys.stderr)
    return EXIT_OK


FSCK_CLEAN, FSCK_CORRECTED, FSCK_UNCORRECTED, FSCK_OPERATIONAL = 0, 1, 4, 8


def cmd_fsck(ctx: Context, args: argparse.Namespace) -> int:
    """Exit codes follow fsck(8): 0 clean, 1 corrected, 4 left uncorrected, 8 operational
    (the repository, a mirror or the cache could not be opened or read)."""
    try:
        return _fsck(ctx, args)
    except UsageError:
        raise
    except CafsError as exc:
        print(f"cafs fsck: {exc}", file=sys.stderr)
        return FSCK_OPERATIONAL
    except BrokenPipeError:
        raise  # the reader went away: main's business
    except OSError as exc:
        # a local file (the cache, a spool) that cannot be read or written: main would
        # give its exit 1, which to fsck(8) means "errors corrected"
        what = os.fsdecode(exc.filename) if exc.filename else "fsck"
        print(f"cafs fsck: {what}: {exc.strerror or exc}", file=sys.stderr)
        return FSCK_OPERATIONAL


def _fsck(ctx: Context, args: argparse.Namespace) -> int:
    """The text report: the counts of the first check; an ``error:`` line for every problem
    found (by the first check, or by a check after a repair round made more readable);
    ``repaired:`` and ``not repaired:`` lines; the unreferenced packs of the last check
    (or that they cannot be told while some snapshot cannot be read whole); the verdict.

    ``--json`` gives one object: ``repository``, ``exit``, the counts (``snapshots``,
    ``packs``, ``nodes``, ``chunks``, ``bytes_read``) of the first check; ``problems``
    (every problem found, as above: ``kind``, ``subject``, ``detail``, ``affects``);
    ``cache_problems``; ``cache_gone_extents`` (cached extents of packs the repository no
    longer has, not checked; null without --cache); ``repaired`` and ``unrepaired`` (lines); ``remaining`` (the
    problems the last check found, described; null without --repair);
    ``unreferenced_packs`` (pack ids of the last check, or null when that cannot be told:
    some snapshot, named in ``unreadable_snapshots``, could not be read whole)."""
    from cafs.check import Checker
    from cafs.repair import repair_in_rounds

    if args.salvage and not args.repair:
        raise UsageError("--salvage is a kind of repair: give --repair too")
    if args.mirror and not args.repair:  # a check reads the repository alone: say so, rather than seem to heal
        print(f"cafs: --mirror is read by --repair only; this check reads {args.repo} alone", file=sys.stderr)
    repo = ctx.repo(args.repo)
    mirrors = [Repository.at(url, deadline=ctx.deadline) for url in args.mirror] if args.repair else []
    for url, mirror in zip(args.mirror, mirrors):
        try:  # its journal entries would be another dataset's
            same_repository(mirror.config, repo.config.repo_id, f"--mirror {url}")
        except OtherRepository as exc:
            raise UsageError(str(exc)) from None
    status = [""]
    checker = Checker(repo, progress=lambda m: status.__setitem__(0, m))
    with Progress(lambda _t: status[0]):
        report = checker.run(args.read_data)
    repaired: list[str] = []
    failed: list[str] = []
    if report.problems and args.repair:
        with Progress(lambda _t: status[0]):
            result, after = repair_in_rounds(repo, report, mirrors, lambda: checker.run(args.read_data),
                                             salvage=args.salvage)
        repaired, failed = result.repaired, result.failed
    else:
        after = report
    cache_problems, cache_repaired, cache_left, cache_gone = [], [], 0, None
    if args.cache is not None:
        from cafs.cachecheck import check_cache

        cache_dir = ctx.cache_dir
        ctx.close()  # the check opens the cache's LMDB itself
        cr = check_cache(repo, cache_dir, repair=args.repair)
        cache_problems, cache_repaired, cache_gone = cr.problems, cr.repaired, cr.gone
        if cache_problems and args.repair:
            cache_left = len(check_cache(repo, cache_dir, repair=False).problems)
        else:
            cache_left = len(cache_problems)
        repaired += cache_repaired
    all_clean = report.clean and not cache_problems
    left = len(after.problems) + cache_left
    code = FSCK_CLEAN if all_clean else FSCK_CORRECTED if left == 0 else FSCK_UNCORRECTED
    with _reader_may_leave():  # cafs fsck | head: the verdict stands, and 0 would say clean
        if args.json:
            print(json.dumps({
                "repository": repo.url, "exit": code, "snapshots": report.snapshots, "packs": report.packs,
                "nodes": report.nodes, "chunks": report.chunks, "bytes_read": report.bytes_read,
                "problems": [{"kind": p.kind, "subject": p.subject, "detail": p.detail, "affects": p.affects}
                             for p in report.problems],
                "cache_problems": cache_problems, "cache_gone_extents": cache_gone,
                "repaired": repaired, "unrepaired": failed,
                "remaining": [p.describe() for p in after.problems] if args.repair else None,
                "unreferenced_packs": after.unreferenced_packs,
                "unreadable_snapshots": after.unreadable_snapshots}, indent=2))
            return code
        print(f"checked {repo.url}: {report.snapshots} snapshots, {report.packs} packs, {report.nodes} nodes, "
              f"{report.chunks} chunk references" + (f", {human_bytes(report.bytes_read)} of data read" if args.read_data else ""))
        for p in report.problems:
            print(f"error: {p.describe()}")
        for line in cache_problems:
            print(f"error: cache: {line}")
        if cache_gone:
            print(f"cache: {cache_gone} extent(s) of packs the repository no longer has (removed or repacked by "
                  "gc): not checked, not an error; the cache evicts them in time, least recently used first")
        for line in repaired:
            print(f"repaired: {line}")
        for line in failed:
            print(f"not repaired: {line}")
        if after.unreferenced_packs is None:
            print("unreferenced packs cannot be told while a snapshot cannot be read whole: "
                  + ", ".join(after.unreadable_snapshots))
        elif after.unreferenced_packs:
            print(f"{len(after.unreferenced_packs)} pack(s) no snapshot references (cafs gc reclaims them)")
        print({FSCK_CLEAN: "no errors", FSCK_CORRECTED: "all errors corrected",
               FSCK_UNCORRECTED: f"{left} error(s) left uncorrected"}[code])
    return code


def cmd_forget(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.gc import forget

    repo = ctx.repo(args.repo)
    if (args.keep_last is None) == (not args.jid):
        raise UsageError("forget needs exactly one of --keep-last N or --jid J")
    bad = [j for j in args.jid if j < 1]
    if bad:
        raise UsageError(f"--jid {bad[0]}: journal ids start at 1")
    removed = forget(repo, ref_name(args.name), keep_last=args.keep_last, jids=args.jid)
    print(f"forgot {len(removed)} snapshot(s) of {args.name}: {', '.join(map(str, removed)) or 'none'}"
          + ("; run cafs gc to reclaim space" if removed else ""))
    return EXIT_OK


def cmd_gc(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.gc import collect

    repo = ctx.repo(args.repo)
    try:
        r = collect(repo, dry_run=args.dry_run, repack_below=args.repack_below)
    except NoSpaceError as exc:
        # the disk that most needs a gc is a full one: say what gc itself must write
        raise NoSpaceError(f"{exc}; gc writes a lock object of a few bytes first, and new packs before it "
                           "deletes the ones it repacks: free a little space on that disk, or give "
                           "--repack-below 0 to delete unreferenced packs only") from None
    unreferenced = len(r.deleted_packs) - r.repacked
    print(f"{r.snapshots} snapshot(s), {r.packs_total} pack(s): "
          f"{'would delete' if args.dry_run else 'deleted'} {unreferenced} unreferenced pack(s), "
          f"{'would repack' if args.dry_run else 'repacked'} {r.repacked}; "
          f"{human_bytes(r.reclaimed_bytes)} {'reclaimable' if args.dry_run else 'reclaimed'}")
    if r.temporaries:
        print(f"removed {r.temporaries} temporary file(s) of interrupted writes, {human_bytes(r.temporary_bytes)}")
    return EXIT_OK


def cmd_copy(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.copy import CopyProgress, copy_snapshots, open_destination, select_snapshots

    spec = parse_spec(args.source, need_snapshot=False)
    if spec.path:
        raise UsageError(f"{args.source}: copy copies whole snapshots; leave out ':PATH'")
    if not 1 <= args.jobs <= 64:
        raise UsageError(f"--jobs {args.jobs}: give 1 to 64")
    src = ctx.repo(spec.repo)
    wanted = select_snapshots(src, spec.selector, every=args.all)
    dst, created = open_destination(src, open_store(args.dest, deadline=ctx.deadline), deadline=ctx.deadline)
    state = CopyProgress()

    def render(elapsed: float) -> str:
        if state.packs_total == 0:
            return f"{state.stage}... {state.nodes_read} nodes read"
        return (f"packs {state.packs_done}/{state.packs_total}, {human_bytes(state.bytes_done)} of "
                f"{human_bytes(state.bytes_total)}, {human_bytes(state.bytes_done / max(elapsed, 1e-9))}/s")

    with Progress(render, enabled=sys.stderr.isatty() and not args.no_progress and not args.json):
        r = copy_snapshots(src, dst, wanted, read_node=ctx.reader(src).node, jobs=args.jobs, progress=state)
    rate = r.bytes_copied / r.seconds if r.seconds > 0 else 0.0
    if args.json:
        print(json.dumps({"source": src.url, "destination": dst.url, "created": created,
                          "copied": r.copied, "present": r.present, "packs_copied": r.packs_copied,
                          "packs_present": r.packs_present, "bytes_copied": r.bytes_copied,
                          "seconds": round(r.seconds, 3), "config_differs": r.config_differs}, indent=2))
        return EXIT_OK
    if created:
        print(f"created {dst.url}, a mirror of {src.url} (same repo id {dst.config.repo_id[:12]} and config)")
    shown = ", ".join(r.copied[:10]) + (f" (+{len(r.copied) - 10} more)" if len(r.copied) > 10 else "")
    print(f"copied {len(r.copied)} snapshot(s) to {dst.url}" + (f": {shown}" if r.copied else "")
          + (f"; {len(r.present)} already there" if r.present else ""))
    print(f"  packs {r.packs_copied} copied, {r.packs_present} already there; "
          f"{human_bytes(r.bytes_copied)} in {r.seconds:.2f} s ({human_bytes(rate)}/s)")
    if r.config_differs:
        print(f"cafs: note: {dst.url} has other chunker parameters or pack size than {src.url}; the copy "
              "is complete, but later imports into it will share fewer chunks with the copied data",
              file=sys.stderr)
    return EXIT_OK


def cmd_cache(ctx: Context, args: argparse.Namespace) -> int:
    """cache status [REPO[#NAME[:PATH]]...] | gc [REPO] --size S | clear [REPO].

    status and gc go through every repository's cache they can open; one that cannot be
    (a newer cafs's layout, a directory another user could write, an LMDB that will not
    open) is named on a line of its own on stderr (and in ``unreadable_caches`` of
    ``--json``), the others are shown (or evicted from) all the same, and the exit code
    is 1, as for ``cafs snapshots`` with a journal entry it cannot read: the answer is
    incomplete. 3 is an import's, whose snapshot is committed."""
    from cafs.cachedir import UnsafeCacheDir
    from cafs.chunkcache import ChunkCache
    from cafs.metacache import MetaCacheError
    from cafs.prefetch import cache_share, plan

    if args.action != "status" and (len(args.targets) > 1 or any("#" in t for t in args.targets)):
        raise UsageError(f"cache {args.action} takes at most one REPO (no #NAME)")
    if (args.size is None) == (args.action == "gc"):  # a forgotten --size emptied the whole cache
        raise UsageError("cache gc needs --size SIZE (the size to evict down to; 0 empties the cache)"
                         if args.action == "gc" else f"--size is for cache gc, not cache {args.action}")
    specs = [parse_spec(t, need_snapshot=False) for t in args.targets]
    repos: dict[str, Repository] = {}
    for spec in specs:
        if spec.repo not in repos:
            repos[spec.repo] = ctx.repo(spec.repo)
    roots = sorted(p for p in ctx.cache_dir.glob("[!.]*") if (p / "meta.lmdb").exists()) if ctx.cache_dir.exists() else []
    if repos:
        wanted = {r.config.repo_id for r in repos.values()}
        roots = [r for r in roots if r.name in wanted]
    if args.action == "clear":
        clear_caches(ctx.cache_dir, roots)
        print(f"cleared {len(roots)} repository cache(s) in {ctx.cache_dir}")
        return EXIT_OK
    caches: dict[str, ChunkCache] = {}
    try:
        def cache_of(repo_id: str) -> ChunkCache:
            if repo_id not in caches:
                meta = ctx.meta_at(repo_id)
                caches[repo_id] = ChunkCache(ctx.cache_dir / repo_id, meta.env, 1 << 62)
            return caches[repo_id]

        docs: list[dict[str, Any]] = []
        unreadable: dict[str, str] = {}  # repo id -> why its cache cannot be opened
        for root in roots:
            try:
                cache = cache_of(root.name)
            except (MetaCacheError, UnsafeCacheDir) as exc:
                unreadable[root.name] = str(exc)  # this cache alone: the others are still shown
                continue
            if args.action == "gc":
                cache.evict(args.size)
            u = cache.usage()
            meta = ctx.meta_at(root.name)
            with meta.env.begin() as txn:
                nodes = txn.stat(meta.nodes_db)["entries"]
            loads = u.hits + u.misses
            docs.append({"repo_id": root.name, "path": str(root), "size": u.size, "limit": u.limit,
                         "extents": u.extents, "nodes": nodes, "hits": u.hits, "misses": u.misses,
                         "hit_rate": round(u.hits / loads, 4) if loads else None, "fetched_bytes": u.fetched,
                         "evicted": cache.counters.evictions if args.action == "gc" else None})
        def share_of(text: str, repo: Repository, snap: Snapshot, path: bytes) -> dict[str, Any]:
            p = plan(ctx.reader(repo), snap.root, [path])
            share = cache_share(cache_of(repo.config.repo_id), p.locations)
            return {"target": text, "snapshot": f"{snap.ref}@{snap.jid}", "path": show_path(path),
                    "files": p.files, "chunks": share.chunks, "cached_chunks": share.cached_chunks,
                    "stored_bytes": share.stored_bytes, "cached_bytes": share.cached_bytes,
                    "share": round(share.fraction, 6)}

        shares: list[dict[str, Any]] = []
        for text, spec in zip(args.targets, specs):
            repo = repos[spec.repo]
            if repo.config.repo_id in unreadable:
                continue  # its cache is named below
            if spec.selector:
                shares.append(share_of(text, repo, find_snapshot(repo, spec.selector), spec.path))
            else:
                shares.extend(share_of(text, repo, repo.snapshot(name), b"") for name in repo.ref_names())
        if args.action == "status" and not args.targets:
            # the snapshots mounts and prefetches used lately: their repositories may be
            # remote, or gone, so each one that cannot be looked at says why (a repository
            # that cannot be opened is tried once, however many of its snapshots are listed)
            opened: dict[str, Repository | CafsError] = {}
            for root in roots:
                if root.name in unreadable:
                    continue
                for text in cache_of(root.name).recorded_snapshots():
                    try:
                        spec = parse_spec(text)
                        if spec.repo not in opened:
                            try:
                                opened[spec.repo] = ctx.repo(spec.repo)
                            except CafsError as exc:
                                opened[spec.repo] = exc
                        got = opened[spec.repo]
                        if isinstance(got, CafsError):
                            raise got
                        shares.append(share_of(text, got, find_snapshot(got, spec.selector), spec.path))
                    except CafsError as exc:
                        shares.append({"target": text, "error": str(exc)})
    finally:
        for cache in caches.values():
            cache.close()
    code = EXIT_ERROR if unreadable else EXIT_OK
    for why in unreadable.values():
        print(f"cafs: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps({"cache_dir": str(ctx.cache_dir), "caches": docs, "snapshots": shares,
                          "unreadable_caches": [{"repo_id": repo_id, "path": str(ctx.cache_dir / repo_id), "error": why}
                                                for repo_id, why in unreadable.items()]}, indent=2))
        return code
    if not docs and not unreadable:
        print(f"no caches in {ctx.cache_dir}" + (" for these repositories" if repos else ""))
    for d in docs:
        limit = f"limit {human_bytes(d['limit'])}" if d["limit"] is not None else "no limit recorded yet"
        use = (f"mount reads {100 * d['hit_rate']:.1f}% from the cache ({d['hits']} hits, {d['misses']} misses, "
               f"{human_bytes(d['fetched_bytes'])} fetched)" if d["hit_rate"] is not None else "no mount reads recorded")
        print(f"{d['repo_id'][:16]}: {human_bytes(d['size'])} of chunks in {d['extents']} extent(s) ({limit}), "
              f"{d['nodes']} node(s); {use}" + (f"; evicted {d['evicted']}" if d["evicted"] is not None else ""))
    for sh in shares:
        if "error" in sh:
            print(f"{sh['target']}: cannot tell how much is cached: {sh['error']}")
            continue
        where = sh["snapshot"] + (f":{sh['path']}" if sh["path"] != "." else "")
        print(f"{where}: {percent(sh['cached_chunks'], sh['chunks'], sh['share'])} cached ({human_bytes(sh['cached_bytes'])} of "
              f"{human_bytes(sh['stored_bytes'])}, {sh['cached_chunks']} of {sh['chunks']} chunks)")
    return code


def clear_caches(cache_dir: Path, roots: list[Path]) -> None:
    """Delete the caches at ``roots``, or none if any is in use (a mount would go on
    writing into deleted files, and their space would never be freed)."""
    from cafs.cacheuse import CacheInUse, clear, remove_leftovers

    try:
        clear(roots)
    except CacheInUse as exc:
        users = "; ".join(f"{root} by {', '.join(map(describe_process, pids)) or 'a running process'}"
                          for root, pids in exc.users.items())
        raise CafsError(f"cache in use, nothing deleted: {users}; unmount (or stop) them first, "
                        "or free the chunk space while mounted: cafs cache gc --size 0") from None
    remove_leftovers(cache_dir)


def describe_process(pid: int) -> str:
    """A process for a message: the mount it serves, else its command line."""
    from cafs.mountd import mountpoint_of

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = [os.fsdecode(a) for a in f.read().split(b"\0") if a]
    except OSError:
        return f"pid {pid}"
    mountpoint = mountpoint_of(cmdline)
    if mountpoint is not None:
        return f"the mount at {mountpoint} (pid {pid})"
    return f"pid {pid} ({' '.join(cmdline)[:200]})"


def percent(done: int, total: int, fraction: float) -> str:
    """``fraction`` as a percentage that shows 100% only when ``done == total``."""
    shown = int(fraction * 1000) / 10  # rounded down
    return f"{100.0 if done == total else min(shown, 99.9):.1f}%"


@dataclass(frozen=True)
class MountInfo:
    root: Path  # the mountpoint
    source: str  # user.cafs.source: REPO#SELECTOR as mounted
    snapshot: str  # user.cafs.snapshot: REF@JID
    cache_dir: Path  # user.cafs.cache
    cache_limit: int | None  # from user.cafs.stats; None if the mount has no chunk cache
    mirrors: tuple[str, ...]  # user.cafs.mirrors: the mount's mirror= options


def find_mount(path: str) -> MountInfo | None:
    """The cafs mount holding ``path`` (its root or anything in it), or None if ``path``
    is not in one. Raises UsageError for a mount too old to say its source."""
    here = Path(os.path.abspath(path))
    try:
        dev = os.stat(here).st_dev
    except OSError:
        return None
    root = here
    while root.parent != root:
        try:
            if os.stat(root.parent).st_dev != dev:
                break
        except OSError:
            break
        root = root.parent
    try:
        snapshot = os.getxattr(root, "user.cafs.snapshot").decode()
        stats = json.loads(os.getxattr(root, "user.cafs.stats"))
    except OSError:
        return None
    try:
        source = os.fsdecode(os.getxattr(root, "user.cafs.source"))
        cache_dir = Path(os.fsdecode(os.getxattr(root, "user.cafs.cache")))
    except OSError:
        raise UsageError(f"{root}: this cafs mount does not say its source (an older cafs mounted it); "
                         "remount it, or give REPO#NAME and --cache") from None
    try:
        mirrors = tuple(os.fsdecode(os.getxattr(root, "user.cafs.mirrors")).split("\n"))
    except OSError:
        mirrors = ()  # none named (or an older cafs mounted it)
    limit = stats.get("cache_limit")
    return MountInfo(root, source, snapshot, cache_dir, int(limit) if limit is not None else None, mirrors)


def prefetch_paths(base: bytes, paths: list[str], mount: MountInfo | None) -> list[bytes]:
    """Paths inside the snapshot for the PATH arguments (see ``cafs prefetch --help``)."""
    out = []
    for text in paths:
        if os.path.isabs(text):
            if mount is None:
                raise UsageError(f"{text}: an absolute PATH needs a MOUNTPOINT; give it relative to the snapshot")
            rel = os.path.relpath(os.path.normpath(text), mount.root)
            if rel == ".." or rel.startswith("../"):
                raise UsageError(f"{text}: not inside the mount at {mount.root}")
            out.append(snapshot_path(os.fsencode(rel if rel != "." else "") + slash(text)))
            continue
        parts = [p for p in os.fsencode(text).split(b"/") if p and p != b"."]
        if b".." in parts:
            raise UsageError(f"{text}: '..' is not allowed in a PATH")
        out.append(snapshot_path(b"/".join([base.rstrip(b"/"), *parts]) + slash(text)))
    return out or [base]


def slash(text: str) -> bytes:
    """The trailing slash of a PATH (``d/`` must name a directory), which ``normpath`` and
    splitting drop."""
    return b"/" if text.endswith("/") else b""


def cmd_prefetch(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.chunkcache import ChunkCache
    from cafs.errors import PathNotFound
    from cafs.mountopts import DEFAULT_CACHE_SIZE, MAX_CACHE_SIZE, MIN_CACHE_SIZE
    from cafs.prefetch import MAX_JOBS, PlanProgress, PrefetchState, cache_share, plan, prefetch

    if not 1 <= args.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs {args.jobs}: give 1 to {MAX_JOBS}")
    if args.cache_size is not None and not MIN_CACHE_SIZE <= args.cache_size <= MAX_CACHE_SIZE:
        # the upper bound as for a mount's cache_size: the cache records its limit in 64 bits
        raise UsageError(f"--cache-size {args.cache_size}: between {MIN_CACHE_SIZE} bytes and 1E")
    mount = find_mount(args.target) if os.path.exists(args.target) else None
    if mount is not None:
        if args.cache or args.cache_size is not None:
            raise UsageError(f"{args.target}: a mount is prefetched into its own cache; "
                             "--cache and --cache-size are for a SOURCE")
        if mount.cache_limit is None:
            raise UsageError(f"{mount.root}: this mount reads its repository in place (cache_mode=meta) and "
                             "has no chunk cache to fill; mount with cache_mode=full to use one")
        spec = parse_spec(mount.source)
        selector, base = mount.snapshot, os.fsencode(os.path.relpath(os.path.abspath(args.target), mount.root))
        base = b"" if base == b"." else base
        ctx.cache_dir = mount.cache_dir
        ctx.add_mirrors(mount.mirrors)
    elif "#" in args.target:
        spec = parse_spec(args.target)
        selector, base = spec.selector, spec.path
    elif os.path.exists(args.target):
        raise UsageError(f"{args.target}: not in a cafs mount (give a mountpoint or REPO#NAME)")
    else:
        raise UsageError(f"{args.target!r}: neither a cafs mount nor a snapshot (REPO#NAME[@JID], REPO#ROOTID)")
    paths = prefetch_paths(base, args.paths, mount)
    repo = ctx.repo(spec.repo)
    snap = find_snapshot(repo, selector)
    shown = named = f"{repo.url}#{snap.ref}@{snap.jid}"
    if paths != [b""]:
        shown += " " + " ".join(show_path(p) for p in paths)
    progress = sys.stderr.isatty() and not args.no_progress and not args.json
    walked = PlanProgress()
    with Progress(lambda _t: f"reading the tree: {walked.files} files, {walked.chunks} chunks", enabled=progress):
        try:
            p = plan(ctx.reader(repo), snap.root, paths, walked)
        except PathNotFound as exc:
            raise UsageError(f"{named}: {exc}") from None
    root = ctx.cache_dir / repo.config.repo_id
    cache = ChunkCache(root, ctx.meta(repo).env, DEFAULT_CACHE_SIZE)
    try:
        recorded = cache.usage().limit
        cache.limit = mount.cache_limit if mount is not None and mount.cache_limit else \
            args.cache_size or recorded or DEFAULT_CACHE_SIZE
        if p.stored_bytes > cache.limit:
            print(f"cafs: warning: {shown} holds {human_bytes(p.stored_bytes)}, more than the cache limit of "
                  f"{human_bytes(cache.limit)}: only part of it will stay cached"
                  + ("" if mount else " (--cache-size raises the limit)"), file=sys.stderr)
        state = PrefetchState()

        def render(elapsed: float) -> str:
            rate = state.done_bytes / elapsed if elapsed > 0 else 0.0
            left = state.total_bytes - state.done_bytes
            pct = 100 * state.done_bytes / state.total_bytes if state.total_bytes else 100.0
            return (f"prefetch {human_bytes(state.done_bytes)} of {human_bytes(state.total_bytes)} ({pct:.0f}%), "
                    f"{human_bytes(rate)}/s, ETA {human_duration(left / rate) if rate > 0 else '?'}")

        with Progress(render, enabled=progress):
            r = prefetch(repo, cache, p.locations, jobs=args.jobs, state=state)
        after = cache_share(cache, p.locations)
        try:
            cache.record_use()
            cache.record_snapshot(recorded_snapshot(spec.repo, snap))
        except CafsError:
            pass  # the limit and the snapshot are hints for later commands
    finally:
        cache.close()
    rate = r.fetched_bytes / r.seconds if r.seconds > 0 else 0.0
    with _reader_may_leave():
        if args.json:
            print(json.dumps({
                "snapshot": f"{snap.ref}@{snap.jid}", "repository": repo.url, "root": snap.root_id.hex(),
                "paths": [show_path(x) for x in paths], "cache": str(root), "cache_limit": cache.limit,
                "files": p.files, "logical_bytes": p.logical_bytes, "chunks": r.chunks, "stored_bytes": r.stored_bytes,
                "skipped_chunks": r.skipped_chunks, "skipped_bytes": r.skipped_bytes,
                "fetched_chunks": r.fetched_chunks, "fetched_bytes": r.fetched_bytes, "runs": r.runs,
                "found_chunks": r.found_chunks, "failed_chunks": r.failed_chunks, "errors": r.errors,
                "cache_full": r.cache_full, "seconds": round(r.seconds, 3),
                "cached_chunks": after.cached_chunks, "cached_bytes": after.cached_bytes,
                "cached_share": round(after.fraction, 6)}, indent=2))
        else:
            print(f"{shown}: {p.files} files, {human_bytes(r.stored_bytes)} stored in {r.chunks} distinct chunks")
            print(f"  fetched {human_bytes(r.fetched_bytes)} in {r.fetched_chunks} chunks ({r.runs} runs) in "
                  f"{r.seconds:.2f} s ({human_bytes(rate)}/s); {human_bytes(r.skipped_bytes)} in "
                  f"{r.skipped_chunks} chunks were cached already")
            print(f"  cached now: {human_bytes(after.cached_bytes)} of {human_bytes(after.stored_bytes)} "
                  f"({percent(after.cached_chunks, after.chunks, after.fraction)}) in {root}")
    if r.cache_full:
        print(f"cafs: warning: the disk under {root} is full: some chunks were not cached", file=sys.stderr)
    for message in r.errors:
        print(f"cafs: prefetch: {message}", file=sys.stderr)
    if r.failed_chunks:
        print(f"cafs: {r.failed_chunks} chunk(s) could not be fetched intact from any source and were not "
              f"cached; `cafs fsck {repo.url} --read-data` checks the repository", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def parse_fraction(text: str, zero: bool = False) -> float:
    """A fraction in (0, 1], or [0, 1] with ``zero``, as ``0.1`` or ``10%``."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (0.1, 10%)") from None
    if not 0 <= value <= 1 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"{text!r}: the fraction must be in {'[' if zero else '('}0, 1]")
    return value


def cmd_mount(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.mount_helper import mount
    from cafs.mountopts import valued_option

    options = list(args.options)
    if args.cache is not None:  # the --cache of every command: -o cache=DIR (both, differing: an error)
        options.append(valued_option("cache", str(Path(args.cache).absolute())))
    return mount(args.source, args.mountpoint, ",".join(options), foreground=args.foreground)


def cmd_umount(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.mount_helper import unmount

    unmount(args.mountpoint)
    return EXIT_OK


HELPER_TEMPLATE = """#!/bin/sh
# mount(8) helper for cafs, written by `cafs install-mount-helper`.
exec {python} -m cafs.entry mount.cafs "$@"
"""


def cmd_install_mount_helper(ctx: Context, args: argparse.Namespace) -> int:
    dest = Path(args.dest)
    if not dest.name:  # '' or '/': no file name to write the helper under
        raise UsageError(f"--dest {args.dest!r}: name the file to install the mount helper as")
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        tmp.write_text(HELPER_TEMPLATE.format(python=sys.executable))
        tmp.chmod(0o755)
        tmp.replace(dest)
    except OSError as exc:
        raise UsageError(f"{dest}: cannot install the mount helper: {exc.strerror}") from None
    print(f"installed {dest} (runs {sys.executable} -m cafs.entry mount.cafs)")
    return EXIT_OK


def mount_stats(path: str, timeout: float = STATS_TIMEOUT) -> dict[str, Any] | None:
    """The counters of the cafs mount at ``path``, or None if none is mounted there.
    Raises ``MountNotAnswering`` if its daemon is gone or does not answer in ``timeout`` s."""
    from cafs.mountquery import root_xattr

    raw = root_xattr(path, "user.cafs.stats", timeout)
    return None if raw is None else dict(json.loads(raw))


def _cafs_mount_holding(path: str) -> str | None:
    """The mountpoint of the cafs mount that ``path`` (not a mountpoint: asked after
    ``mount_stats``) lies in, if any."""
    from cafs.mounttable import CAFS_FSTYPE, mounted_at, mounts

    try:
        device = os.stat(path).st_dev
    except OSError:
        return None
    table = mounts()
    where = mounted_at(device, table)
    if where is None or not [e for e in table if e.mountpoint == where and e.fstype == CAFS_FSTYPE]:
        return None
    return where


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.snapinfo import repo_space, snapshot_space
    from cafs.tree import resolve
    # a mountpoint is known from the mount table, before anything touches it: a daemon
    # that is gone or hung would fail or hold every look at the path
    counters = mount_stats(args.target, args.timeout) if "#" not in args.target else None
    if counters is None and "#" not in args.target and not os.path.exists(os.path.join(args.target, "config")):
        inside = _cafs_mount_holding(args.target)
        if inside is not None:
            raise UsageError(f"{args.target}: a path inside the cafs mount at {inside}; its counters: "
                             f"cafs stats {inside}")
        if os.path.isdir(args.target):
            raise UsageError(f"{args.target}: neither a repository nor a cafs mount")
    if counters is not None:
        if args.json:
            print(json.dumps(counters, indent=2))
        else:
            width = max(map(len, counters), default=0)
            for key, value in counters.items():
                print(f"{key.replace('_', ' '):<{width}} {value}")
        return EXIT_OK
    spec = parse_spec(args.target, need_snapshot=False)
    repo = ctx.repo(spec.repo)
    code = EXIT_OK
    if spec.selector:
        snap = find_snapshot(repo, spec.selector)
        reader = ctx.reader(repo)
        s = snapshot_space(reader, resolve(reader, snap.root, spec.path))
        doc = {"snapshot": f"{snap.ref}@{snap.jid}", "root": snap.root_id.hex(), "files": s.files,
               "dirs": s.dirs, "symlinks": s.symlinks, "logical_bytes": s.logical_bytes,
               "unique_bytes": s.unique_bytes, "stored_bytes": s.stored_bytes, "chunks": s.chunks,
               "packs": s.packs, "dedup_ratio": round(s.dedup_ratio, 3)}
    else:
        r = repo_space(repo)
        doc = {"repository": repo.url, "snapshots": r.snapshots, "logical_bytes": r.logical_bytes,
               "unique_bytes": r.unique_bytes, "stored_bytes": r.stored_bytes, "chunks": r.data_chunks,
               "packs": r.packs, "dedup_ratio": round(r.dedup_ratio, 3)}
        code = _report_damaged_entries(r.damaged)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            shown = f"{human_bytes(value)} ({value})" if key.endswith("_bytes") and isinstance(value, int) else value
            print(f"{key.replace('_', ' '):<14} {shown}")
    return code


def cmd_diff(ctx: Context, args: argparse.Namespace) -> int:
    from cafs.snapinfo import diff_trees
    from cafs.tree import resolve
    repo_a, snap_a, path_a = ctx.snapshot(args.a)
    repo_b, snap_b, path_b = ctx.snapshot(args.b)
    if repo_a.config.repo_id != repo_b.config.repo_id:
        raise UsageError("diff compares two snapshots of the same repository")
    reader = ctx.reader(repo_a)
    a = resolve(reader, snap_a.root, path_a)
    b = resolve(reader, snap_b.root, path_b)
    if not (a.is_dir and b.is_dir):
        raise UsageError("diff compares two directories")
    for mark, path in diff_trees(reader, a, b):
        print(f"{mark} {show_path(path)}")
    return EXIT_OK


# -- parsing ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cafs", description="content-addressed dataset filesystem")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, *, cache_option: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if cache_option:
            sp.add_argument("--cache", metavar="DIR", help="local cache directory")
        return sp

    sp = command("init", "create a repository")
    sp.add_argument("repo")
    sp.add_argument("--chunk-min", type=parse_size, metavar="SIZE")
    sp.add_argument("--chunk-avg", type=parse_size, metavar="SIZE")
    sp.add_argument("--chunk-max", type=parse_size, metavar="SIZE")
    sp.add_argument("--pack-size", type=parse_size, metavar="SIZE")
    sp.set_defaults(func=cmd_init)

    sp = command("import", "import a directory tree as a new snapshot")
    sp.add_argument("dir")
    sp.add_argument("repo")
    sp.add_argument("--name", required=True, help="the ref to record the snapshot under")
    sp.add_argument("--strict", action="store_true", help="abort without committing if any path is skipped")
    sp.add_argument("--reread", action="store_true",
                    help="read every file, even those unchanged since the ref's last snapshot (restic's --force): "
                         "stores again what fsck --repair found lost")
    sp.add_argument("--no-progress", action="store_true")
    sp.set_defaults(func=cmd_import)

    sp = command("snapshots", "list the journal of every ref, or of one")
    sp.add_argument("repo")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_snapshots)

    sp = command("ls", "list entries of a snapshot")
    sp.add_argument("snapshot", metavar="REPO#NAME[:PATH]")
    sp.add_argument("-R", "--recursive", action="store_true")
    add_read_mirrors(sp)
    sp.set_defaults(func=cmd_ls)

    sp = command("cat", "write a file of a snapshot to stdout")
    sp.add_argument("snapshot", metavar="REPO#NAME:PATH")
    add_read_mirrors(sp)
    sp.set_defaults(func=cmd_cat)

    sp = command("get", "extract a file or tree, verified and resumable")
    sp.add_argument("snapshot", metavar="REPO#NAME[:PATH]")
    sp.add_argument("dest")
    add_read_mirrors(sp)
    sp.set_defaults(func=cmd_get)

    sp = command("stats", "space used by a repository or a snapshot; counters of a mount")
    sp.add_argument("target", metavar="REPO[#NAME]|MOUNTPOINT")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--timeout", type=parse_seconds, default=STATS_TIMEOUT, metavar="SECONDS",
                    help=f"how long to wait for a mount's answer (default {STATS_TIMEOUT:g})")
    sp.set_defaults(func=cmd_stats)

    sp = command("fsck", "check a repository; exit 0 clean, 1 corrected, 4 errors left, 8 operational error",
                 cache_option=False)
    sp.add_argument("repo")
    sp.add_argument("--read-data", nargs="?", type=parse_fraction, const=1.0, default=0.0, metavar="FRACTION",
                    help="also read and verify chunk bytes (all, or a random fraction of packs)")
    sp.add_argument("--repair", action="store_true", help="replace damaged packs and journal entries by verified copies from --mirror, rewrite bad indexes, drop bad cache entries")
    sp.add_argument("--mirror", action="append", default=[], metavar="URL", help="with --repair: a repository holding good copies")
    sp.add_argument("--salvage", action="store_true",
                    help="with --repair: a damaged pack no mirror has intact gives its intact objects to new packs "
                         "and is set aside under damaged/ (then `cafs import --reread` stores the lost ones again)")
    sp.add_argument("--cache", nargs="?", const="", default=None, metavar="DIR",
                    help="also check this host's cache for the repository (default cache dir if no DIR)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_fsck)

    sp = command("forget", "remove snapshots from a ref's journal (the newest is always kept)")
    sp.add_argument("repo")
    sp.add_argument("name")
    sp.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest snapshots, forget the others")
    sp.add_argument("--jid", type=int, action="append", default=[], metavar="J",
                    help="forget the snapshot with journal id J (repeatable: --jid 3 --jid 4)")
    sp.set_defaults(func=cmd_forget)

    sp = command("cache", "this host's cache: status, gc (evict down to --size), clear")
    sp.add_argument("action", choices=["status", "gc", "clear"])
    sp.add_argument("targets", nargs="*", metavar="REPO[#NAME[@JID][:PATH]]",
                    help="only the cache of this repository; status: also the share cached of each "
                         "snapshot named (of every ref's latest for a bare REPO)")
    sp.add_argument("--size", type=parse_size, metavar="SIZE",
                    help="gc (required): evict least recently used chunks down to this size (0: all)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_cache, more_positionals="targets")

    sp = command("prefetch", "fill this host's chunk cache with a snapshot (or paths in it), verified")
    sp.add_argument("target", metavar="MOUNTPOINT|SOURCE",
                    help="a cafs mount (or a directory in one), or REPO#NAME[@JID][:PATH] / REPO#ROOTID")
    sp.add_argument("paths", nargs="*", metavar="PATH", help="only these paths, relative to the target "
                    "(absolute ones inside the mount with a MOUNTPOINT)")
    sp.add_argument("--jobs", type=int, default=8, metavar="N", help="runs (up to 8 MiB each) loaded at once "
                    "(default 8, at most 8)")
    sp.add_argument("--cache-size", type=parse_size, metavar="SIZE",
                    help="the cache's limit (default: the limit its mounts use, else 10G); SOURCE only")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--json", action="store_true")
    add_read_mirrors(sp)
    sp.set_defaults(func=cmd_prefetch, more_positionals="paths")

    sp = command("gc", "delete packs no snapshot references; repack mostly-garbage packs")
    sp.add_argument("repo")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--repack-below", type=lambda t: parse_fraction(t, zero=True), default=0.5, metavar="FRACTION",
                    help="repack packs whose live bytes are below this share (default 0.5; 0: repack none, "
                         "only delete unreferenced packs)")
    sp.set_defaults(func=cmd_gc)

    sp = command("copy", "copy snapshots, and the packs they need, to another repository (fill a mirror)")
    sp.add_argument("source", metavar="SRC_REPO[#NAME[@JID]]")
    sp.add_argument("dest", metavar="DST_REPO", help="created with the source's config if it does not exist")
    sp.add_argument("--all", action="store_true",
                    help="every snapshot of every ref (or of ref NAME), with the same jids")
    sp.add_argument("--jobs", type=int, default=4, metavar="N", help="packs copied at once (default 4)")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_copy)

    sp = command("mount", "mount a snapshot read-only (the same as mount.cafs)")
    sp.add_argument("source", metavar="SOURCE", help="REPO#NAME, REPO#NAME@JID or REPO#ROOTID")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", help=OPTIONS_HELP)
    sp.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground, logging to stderr")
    sp.set_defaults(func=cmd_mount)

    sp = command("install-mount-helper", "install /sbin/mount.cafs so mount -t cafs and fstab work")
    sp.add_argument("--dest", default="/sbin/mount.cafs")
    sp.set_defaults(func=cmd_install_mount_helper)

    sp = command("umount", "unmount a cafs mount")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.set_defaults(func=cmd_umount)

    sp = command("diff", "paths added, removed and changed between two snapshots")
    sp.add_argument("a", metavar="REPO#A")
    sp.add_argument("b", metavar="REPO#B")
    sp.set_defaults(func=cmd_diff)
    return p


@contextmanager
def _context(args: argparse.Namespace) -> Iterator[Context]:
    ctx = Context(args)
    try:
        yield ctx
    finally:
        ctx.close()


@contextmanager
def _fewer_collections() -> Iterator[None]:
    """Python's cycle collector every ``GC_EVERY`` new objects instead of every 700. A
    command makes objects by the million (entries, locations, index records) and almost
    none in cycles; at 700 the collector took about 6% of an import of 100,000 small files
    (user CPU 1.72-1.88 s against 1.58-1.77 s at 10,000, four alternating runs)."""
    before = gc.get_threshold()
    gc.set_threshold(GC_EVERY, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@contextmanager
def _terminations_as_interrupts(received: list[int]) -> Iterator[None]:
    """SIGTERM (a batch scheduler cancelling the job, ``kill``) and SIGHUP (a closed
    terminal) end a command as Ctrl-C does, through its clean-up: left to their default,
    they killed it with its repository lock in place, which another host takes for stale
    only after 30 minutes. Each is turned into a SIGINT, which Python (and trio, inside
    its loops) turns into KeyboardInterrupt where that is safe; its number is appended
    to ``received``. A command started with ``&`` by a script finds SIGINT ignored (the
    shell's doing): it is handled as usual meanwhile, else SIGTERM could not end the
    command safely inside trio, and a Ctrl-C meant for the script ends it too."""
    def handler(signum: int, _frame: Any) -> None:
        received.append(signum)
        signal.raise_signal(signal.SIGINT)

    before = {signum: signal.signal(signum, handler) for signum in TERMINATIONS}
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        before[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, old in before.items():
            signal.signal(signum, old)


@contextmanager
def _interrupts_kept() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in whatever Python code the main thread runs at
    that moment, and that may be a finalizer (a ``__del__``, a weakref callback) run by the
    collector or by a dropped reference. Python reports such an exception as "Exception
    ignored in ..." with a traceback, and drops it: the command went on and exited 0
    (``cafs gc`` did so about once in twenty Ctrl-Cs). So an interrupt a finalizer
    swallowed is delivered again, as a SIGINT to the main thread ``REDELIVER`` seconds
    later, once the finalizer is done (again, should another finalizer swallow that one)."""
    before = sys.unraisablehook
    main_thread = threading.get_ident()
    active = threading.Event()
    active.set()

    def redeliver() -> None:
        if active.is_set():
            signal.pthread_kill(main_thread, signal.SIGINT)

    def hook(unraisable: Any) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            timer = threading.Timer(REDELIVER, redeliver)
            timer.daemon = True
            timer.start()
        else:
            before(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        active.clear()
        sys.unraisablehook = before


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # positionals after an option (cafs prefetch SRC --jobs 4 PATH): argparse leaves
        # them over; a command whose last positional takes any number collects them
        more = getattr(args, "more_positionals", None)
        if more is None or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        getattr(args, more).extend(extra)
    raise_open_files_limit()  # deep trees take a descriptor per level
    code: int | None = None
    terminated: list[int] = []
    try:
        with _terminations_as_interrupts(terminated), _interrupts_kept(), _fewer_collections(), \
                _context(args) as ctx:
            code = int(args.func(ctx, args))
        if sys.stdout is not None:
            sys.stdout.flush()  # a full disk or a closed pipe is met here, not at exit
        return code
    except UsageError as exc:
        print(f"cafs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CafsError as exc:
        print(f"cafs: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader went away (cafs cat | head): not our error; a command that got to
        # its end keeps its code (an import that skipped paths, an fsck's verdict)
        _discard_stdout()
        return EXIT_OK if code is None else code
    except OSError as exc:  # writing the output failed (a full disk, /dev/full, EIO)
        if exc.filename is None and cwd_gone():  # os.getcwd() for a relative path
            print(f"cafs: {CWD_GONE}", file=sys.stderr)
            return EXIT_ERROR
        what = os.fsdecode(exc.filename) if exc.filename else "standard output"
        print(f"cafs: {what}: {exc.strerror or exc}", file=sys.stderr)
        _discard_stdout()
        return EXIT_ERROR
    except KeyboardInterrupt:
        if terminated:
            print(f"cafs: stopped by {signal.Signals(terminated[0]).name}", file=sys.stderr)
            return 128 + terminated[0]
        print("cafs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the flush at exit does not fail again."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())

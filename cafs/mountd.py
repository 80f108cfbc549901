"""The mount daemon: one process serves one mounted snapshot.

This is the only module that calls ``pyfuse3.init``, ``pyfuse3.main`` and
``pyfuse3.close`` (pyfuse3 keeps one session per process in module globals), and it gives
pyfuse3's request loop ``cafs.fuse_loop``'s cheaper wait for the FUSE device. The
process never touches its own mountpoint from the trio thread; setting the kernel
readahead (which must stat the mountpoint) runs in a worker thread while the loop
serves.

``serve`` mounts, reports readiness through a callback once the filesystem answers,
serves until SIGTERM/SIGINT/SIGHUP or an unmount, then unmounts. SIGUSR1 and SIGUSR2
log the mount's counters (those of ``cafs stats``); their default action would have
ended the daemon, with no line in the log to say why the mount was gone (batch
schedulers send either to every process of a job, e.g. before it is preempted). Once mounted it works
from ``/``, so that it keeps no directory (nor the filesystem holding it) busy. ``auto_unmount`` makes
libfuse's helper unmount if this process dies, even by ``kill -9``.

A signal ends the mount promptly even while reads wait on a stalled store: every wait
on the store ends at once (those reads get EIO, as does any later read that the cache
cannot serve), the mount is detached (``fusermount3 -u -z``: it leaves /proc/mounts at
once, and no new file can be opened), and the daemon keeps answering until the files
still open are closed, which ends the kernel's connection, or for ``EXIT_GRACE``
seconds at most. Answering after the detach matters: the kernel asks again at once,
page by page, for what a failed readahead did not get, and a request left unanswered
when the loop stops fails with ENOTCONN rather than EIO. The daemon then exits 0.
It unmounts only its own mount (``Attachment``): one already gone from its path
(``umount -l``) leaves alone whatever is mounted there now. Caveat: a mount covered by
another (mounted on its path, or on a directory above it) cannot be unmounted by path;
the daemon then exits leaving it mounted, dead, and its log says so and what to run.

Run as ``python -m cafs.mountd --ready-fd FD SOURCE MOUNTPOINT -o OPTIONS`` by
``cafs.mount_helper``: it writes ``ok`` or ``error: MESSAGE`` and a newline to FD. If
nobody reads FD any more when the mount is up (the helper was interrupted or killed
while it waited, so nobody learns that the mount is there), it unmounts again as on a
signal.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import faulthandler
import io
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import pyfuse3
import trio

from cafs import cachedir, fuse_loop
from cafs.chunkcache import ChunkCache
from cafs.errors import CafsError
from cafs.fetch import Fetcher
from cafs.fileio import raise_open_files_limit
from cafs.fsmodel import SnapshotFS
from cafs.fuse_adapter import CafsOperations
from cafs.metacache import MetaCache, NodeReader, default_cache_dir
from cafs.mountopts import MountOptions, parse_options
from cafs.mounttable import mounted_at, mounts
from cafs.naming import find_snapshot, parse_spec, recorded_repo, recorded_snapshot, recorded_source
from cafs.repository import Repository
from cafs.stores import LocalStore

log = logging.getLogger("cafs.mount")

CACHE_FLUSH_SECONDS = 2.0
EXIT_GRACE = 2.0  # seconds a signalled daemon answers the files still open after its detach
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
SYSLOG_SOCKET = "/dev/log"


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process; False where that cannot be done.

    glibc gives each thread that allocates under contention an arena of its own, up
    to 8 per core, and a chunk freed in one stays mapped for reuse there. The daemon's
    worker threads pass megabytes of chunk bytes around, so its peak RSS after reading
    1 GiB went from about 225 MB to 170 MB with two arenas, at the same speed
    (measured with a cold remote mount read, 2026-11-23)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def display_source(source: str) -> str:
    """The source as shown in /proc/mounts: as given, but without credentials.

    mount(8) takes a line of fstab as mounted already only when /proc/mounts shows its
    source as written, so ``mount -a`` run again would mount it once more (and fail as
    busy) if the source were shown altered in any other way."""
    shown = source
    if "://" in shown:
        scheme, rest = shown.split("://", 1)
        host, slash, path = rest.partition("/")
        shown = f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"
    return shown


def fsname_option(source: str) -> str:
    """The ``fsname=`` option for libfuse: its option parser splits at commas and takes
    a backslash as an escape, so both are escaped with a backslash."""
    return "fsname=" + display_source(source).replace("\\", "\\\\").replace(",", "\\,")


def why_not(exc: OSError) -> str:
    """Why a directory could not be made or a file in it opened, for a message; the
    FileExistsError of ``Path.mkdir(exist_ok=True)`` means a file is where a directory
    must be."""
    if isinstance(exc, FileExistsError):
        return f"{os.fsdecode(exc.filename)} is not a directory" if exc.filename else "not a directory"
    return exc.strerror or str(exc)


def setup_logging(opts: MountOptions, cache_dir: Path, foreground: bool, *,
                  syslog_socket: str = SYSLOG_SOCKET) -> None:
    """Send the ``cafs`` loggers to stderr (foreground), syslog (``log=syslog``, or by
    default when a syslog daemon listens) or a file (``log=PATH``, else ``mount.log`` in
    the cache directory; made anew if it is rotated or deleted). Raises CafsError when
    the chosen place cannot take them at start; later failures lose lines, never the
    mount (``LogFile``)."""
    root = logging.getLogger("cafs")
    root.setLevel(logging.DEBUG if opts.debug else logging.INFO)
    fmt = "%(asctime)s cafs[%(process)d] %(levelname)s %(name)s: %(message)s"
    if opts.log == "syslog" and not foreground and not _listening(syslog_socket):
        # SysLogHandler ignores a socket nobody listens on: every message would be lost
        raise CafsError(f"log=syslog: no syslog daemon listens on {syslog_socket}; use log=FILE")
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif opts.log == "syslog" or (opts.log is None and _listening(syslog_socket)):
        handler = logging.handlers.SysLogHandler(syslog_socket)
        fmt = "cafs[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        path = Path(opts.log) if opts.log else cache_dir / "mount.log"
        try:
            # reopened when the file is moved away or deleted (logrotate's default way),
            # rather than written on into the rotated file until that is deleted
            handler = LogFile(path, follow=bool(opts.log))
        except OSError as exc:
            what = f"log={opts.log}" if opts.log else "log file"
            raise CafsError(f"{what}: cannot write the log {path}: {why_not(exc)}") from None
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)


class LogFile(logging.handlers.WatchedFileHandler):
    """The mount's log file, made anew (its directory too) when it is moved away or
    deleted, and never raising into the code that logs.

    ``WatchedFileHandler`` reopens the file outside its error handling: once the log's
    directory was deleted (an admin's ``rm -rf``, a cleaner of old files), the next line
    logged raised FileNotFoundError into the daemon, which ended the mount. Here any
    error goes to ``handleError``, and the line may be lost. That says so on stderr (the
    cache's ``mountd.stderr``) once when lines start to fail and once when they are
    written again, rather than with logging's traceback for every line (some 2 KB
    each, on another disk than the full one).

    Its file is made mode 0600, whatever the umask (the log names the snapshot's files);
    with ``follow=False`` (the log in the cache directory) it is opened as
    ``cafs.cachedir.open_own`` opens: never through a symlink, and only if it is this
    user's."""

    def __init__(self, path: Path, *, follow: bool) -> None:
        self.follow = follow
        super().__init__(path)
        self.lost = 0  # lines that failed since the log last took one (the stream's buffer may keep some)

    def _open(self) -> io.TextIOWrapper:
        path = Path(self.baseFilename)
        flags = os.O_WRONLY | os.O_APPEND
        if self.follow:
            cachedir.make_dirs(path.parent)  # the user's choice: not held to the cache's rule
            fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, cachedir.FILE_MODE)
        else:
            cachedir.shared(path.parent)
            fd = cachedir.open_own(path, flags)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        lost = self.lost
        try:
            self.reopenIfNeeded()
            logging.FileHandler.emit(self, record)
        except Exception:
            self.handleError(record)
        if lost and self.lost == lost:
            self._note(f"writes the log {self.baseFilename} again; of the {lost} line(s) that failed, "
                       "those the file's buffer did not keep are missing")
            self.lost = 0

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the lines its buffer kept for a disk still full are lost
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.lost:
            self._note(f"cannot write the log {self.baseFilename}: {sys.exc_info()[1]}; "
                       "lines may be lost until it can (not said again)")
        self.lost += 1

    @staticmethod
    def _note(text: str) -> None:
        try:
            sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} cafs[{os.getpid()}]: {text}\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):  # a full disk there too, or no stderr
            pass


def _listening(path: str) -> bool:
    """Whether a local socket at ``path`` takes connections (a syslog daemon's does)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
            except OSError:
                continue
            return True
    return False


def set_readahead(device: int, size: int) -> None:
    """Raise the kernel readahead of the mount's bdi so sequential reads arrive large."""
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(max(4, size // 1024)))
    except OSError as exc:
        log.warning("cannot set readahead via %s: %s", path, exc)


@dataclass
class Attachment:
    """Where this daemon's mount is, so that it never unmounts another.

    Unmounting is by path (``fusermount3 -u -z``, and libfuse's unmount in
    ``pyfuse3.close``, for root a lazy umount2 of whatever is there), and once this
    mount is gone from its path (``umount -l`` while a file is open) another filesystem
    may be mounted there. The mount is known by its device (the st_dev of its root,
    taken once it serves) and found in the mount table by it."""
    device: int | None = None  # None until known
    known: trio.Event = field(default_factory=trio.Event)
    detached: bool = False  # detached by this daemon

    def where(self) -> str | None:
        """The path of this mount while it is there on top; None once it is not (or
        its device is not known yet)."""
        return None if self.device is None else mounted_at(self.device)

    def covered(self) -> str | None:
        """Where this mount is while another mount covers it (mounted on its path, or on
        a directory above): it cannot be unmounted by path then. None if it is on top,
        gone, or its device is not known."""
        if self.device is None or self.where() is not None:
            return None
        ours = [e.mountpoint for e in mounts() if e.device == self.device]
        return ours[-1] if ours else None

    def to_unmount(self) -> bool:
        """Whether ``pyfuse3.close`` should unmount: not if this daemon detached the
        mount or it is gone from its path; yes before its device is known (it was
        mounted a moment ago)."""
        return not self.detached and (self.device is None or self.where() is not None)


def build_fs(source: str, opts: MountOptions, stack: ExitStack) -> SnapshotFS:
    spec = parse_spec(source)
    repo = Repository.at(spec.repo, mirrors=opts.mirrors, deadline=opts.timeout)
    snapshot = find_snapshot(repo, spec.selector)
    if spec.path:
        raise CafsError(f"{source}: mounting a path inside a snapshot is not supported; mount the snapshot")
    cache_dir = (opts.cache or default_cache_dir(dict(os.environ))).absolute()
    cache_root = cache_dir / repo.config.repo_id
    meta = MetaCache.open_mending(cache_root)  # a damaged cache must not stop a mount
    stack.callback(meta.close)
    mode = opts.cache_mode
    if mode == "auto":
        mode = "meta" if isinstance(repo.primary, LocalStore) else "full"
    cache = None
    if mode == "full":
        cache = ChunkCache(cache_root, meta.env, opts.cache_size)
        stack.callback(cache.close)
        try:
            cache.record_use()  # the limit, for cafs cache status and cafs prefetch
            cache.record_snapshot(recorded_snapshot(spec.repo, snapshot))
        except CafsError as exc:
            log.warning("%s", exc)
    log.info("chunk cache: %s", f"{cache_root} (limit {opts.cache_size} bytes)" if cache else "off, reading the repository in place")
    return SnapshotFS(snapshot, NodeReader(repo, meta, defer_writes=True, defer_fetches=True), Fetcher(repo, cache),
                      readahead=opts.readahead, source=recorded_source(source), cache_dir=str(cache_dir),
                      mirrors=tuple(recorded_repo(url) for url in opts.mirrors))


async def detach(mountpoint: str) -> bool:
    """Lazily unmount ``mountpoint`` from another process (``fusermount3 -u -z``, or
    ``umount -l`` without it), while this one keeps serving; whether that worked."""
    tool = shutil.which("fusermount3")
    cmd = [tool, "-u", "-z", mountpoint] if tool else ["umount", "-l", mountpoint]
    try:
        done = await trio.run_process(cmd, check=False, stdin=subprocess.DEVNULL, capture_stdout=True,
                                      capture_stderr=True)
    except OSError as exc:
        log.warning("cannot detach %s: %s", mountpoint, exc)
        return False
    if done.returncode != 0:
        log.warning("cannot detach %s: %s", mountpoint, done.stderr.decode(errors="replace").strip())
    return done.returncode == 0


def fuse_options(source: str, opts: MountOptions) -> set[str]:
    options = {fsname_option(source), "subtype=cafs", "ro", "auto_unmount",
               "default_permissions", "noatime"}
    if opts.allow_other:
        options.add("allow_other")
    if opts.noexec:
        options.add("noexec")
    return options


class Complaint:
    """A warning said once while a failure lasts, and a line once it is over: the flushes
    below run every ``CACHE_FLUSH_SECONDS``, and on a full disk each fails alike."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: CafsError) -> None:
        if not self.failing:
            log.warning("cannot %s: %s (not said again until it works)", self.what, exc)
        self.failing = True

    def worked(self) -> None:
        if self.failing:
            log.info("can %s again", self.what)
        self.failing = False


class CacheFlush:
    """Writes what a mount learnt to the host's cache every few seconds (in a worker
    thread; calls are never concurrent): the nodes it fetched, when cached extents were
    last used, and its fetch counters, added to the cache's persistent counters
    (``ChunkCache.record_use``) each increment once: it remembers what it added. A
    failure (the cache's disk full) costs the cache those records, never the mount.
    Each flush first frees the cache's reader slots that dead processes left taken
    (``MetaCache.free_stale_readers``)."""

    def __init__(self) -> None:
        self.hits = self.misses = self.fetched = 0
        self.nodes = Complaint("write fetched nodes to the cache")
        self.touches = Complaint("record when cached chunks were used")
        self.counters = Complaint("record the cache counters")

    def flush(self, fs: SnapshotFS, pending: list[tuple[bytes, bytes]]) -> None:
        if fs.reader.cache is not None:
            # while this mount keeps the cache open, slots of LMDB's reader table that
            # killed processes left taken are not freed by LMDB: without this, they pile
            # up until no other process can open the cache (cafs.metacache)
            fs.reader.cache.free_stale_readers()
        if pending and fs.reader.cache is not None:
            try:
                fs.reader.cache.put_many(pending)
                self.nodes.worked()
            except CafsError as exc:
                self.nodes.failed(exc)
        cache = fs.fetcher.cache
        if cache is None:
            return
        try:
            if cache.flush_touches():
                self.touches.worked()
        except CafsError as exc:
            self.touches.failed(exc)
        c = fs.fetcher.counters
        hits, misses, fetched = c.hits, c.misses, c.bytes_fetched
        if (hits, misses, fetched) == (self.hits, self.misses, self.fetched):
            return
        try:
            cache.record_use(hits - self.hits, misses - self.misses, fetched - self.fetched)
            self.counters.worked()
        except CafsError as exc:
            self.counters.failed(exc)
            return
        self.hits, self.misses, self.fetched = hits, misses, fetched


async def _serve(fs: SnapshotFS, mountpoint: str, opts: MountOptions, ready: Callable[[], bool],
                 flusher: CacheFlush, attachment: Attachment) -> None:
    """Serve until unmounted or signalled."""
    async with fs.fetcher.running(), trio.open_nursery() as nursery:
        async def fuse_loop() -> None:
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

        async def stop() -> None:
            fs.fetcher.close()  # else a read waiting on the store holds pyfuse3.main until its deadline
            await attachment.known.wait()
            where = await trio.to_thread.run_sync(attachment.where)
            if where is None:
                log.info("%s: this mount was unmounted or covered already; not unmounting there", mountpoint)
            else:
                attachment.detached = await detach(where)
            if attachment.detached:
                await trio.sleep(EXIT_GRACE)  # cancelled when the last open file closes
            pyfuse3.terminate()

        stopping = False

        def start_stopping() -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                nursery.start_soon(stop)

        async def on_signals() -> None:
            # the receiver stays open while stopping: a second signal must not kill the
            # daemon with its default action before it has unmounted
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                                           signal.SIGUSR2) as signals:
                async for signum in signals:
                    if signum in (signal.SIGUSR1, signal.SIGUSR2):
                        log.info("signal %d: counters %s", signum, json.dumps(fs.stats()))
                        continue
                    log.info("signal %d: unmounting (reads that need the store fail from now on)", signum)
                    start_stopping()

        async def flush_caches() -> None:
            while True:
                await trio.sleep(CACHE_FLUSH_SECONDS)
                # taken on the trio thread, which is the only one that appends to it
                await trio.to_thread.run_sync(flusher.flush, fs, fs.reader.take_pending())

        nursery.start_soon(fuse_loop)
        nursery.start_soon(on_signals)
        nursery.start_soon(flush_caches)
        # the stat runs in a worker: the root's attributes come from this very loop
        attachment.device = (await trio.to_thread.run_sync(os.stat, mountpoint)).st_dev
        attachment.known.set()
        await trio.to_thread.run_sync(set_readahead, attachment.device, opts.readahead)
        log.info("serving %s@%d on %s", fs.snapshot.ref, fs.snapshot.jid, mountpoint)
        if not ready():
            log.warning("the mount helper is gone (interrupted or killed) before the mount was up: unmounting")
            start_stopping()


def serve(source: str, mountpoint: str, opts: MountOptions, *, foreground: bool,
          ready: Callable[[], bool], fail: Callable[[str], None]) -> int:
    """Mount and serve until unmounted. Returns an exit code; calls ``fail`` with a
    message if the mount could not be made, ``ready`` once it answers: if that returns
    False (nobody was told: the helper that started this daemon is gone), unmounts."""
    limit_malloc_arenas()  # before the first worker thread starts
    raise_open_files_limit()  # a cache file per pack read, and the store's connections
    cache_dir = opts.cache or default_cache_dir(dict(os.environ))
    flusher = CacheFlush()
    with ExitStack() as stack:
        try:
            setup_logging(opts, cache_dir, foreground)
            fs = build_fs(source, opts, stack)
            pyfuse3.init(CafsOperations(fs), mountpoint, fuse_options(source, opts))
        except (CafsError, OSError, RuntimeError) as exc:
            fail(str(exc))
            return 32
        # What a relative path named (the repository, the cache, the log) is open or made
        # absolute by now. Left where the mount was started, the process would keep that
        # directory busy for as long as it serves: its filesystem (a USB disk, another
        # cafs mount) could not be unmounted.
        os.chdir("/")
        fuse_loop.install()
        attachment = Attachment()
        try:
            trio.run(_serve, fs, mountpoint, opts, ready, flusher, attachment)
        except BaseException:
            log.exception("the mount loop failed")
            pyfuse3.close(unmount=attachment.to_unmount())
            raise
        # once detached, the mountpoint may be another mount's already: not unmounted again
        pyfuse3.close(unmount=attachment.to_unmount())
        flusher.flush(fs, fs.reader.take_pending())
        covered = attachment.covered()
        if covered is None:
            log.info("unmounted %s", mountpoint)
        else:
            log.warning("%s stays mounted, covered by another mount, and answers no more ('Transport endpoint "
                        "is not connected'): unmount what covers it, then run fusermount3 -u %s", covered, covered)
    return 0


def mountpoint_of(cmdline: list[str]) -> str | None:
    """The mountpoint of a daemon, from its command line (``/proc/PID/cmdline``) as
    ``cafs.mount_helper`` starts it; None for any other process."""
    if "cafs.mountd" not in cmdline:
        return None
    args = cmdline[cmdline.index("cafs.mountd") + 1:]
    positional = [a for i, a in enumerate(args)
                  if not a.startswith("-") and (i == 0 or args[i - 1] not in ("--ready-fd", "-o"))]
    return positional[1] if len(positional) == 2 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cafs-mountd")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", default="")
    args = p.parse_args(argv)
    # A fatal signal ends the process with no exception to log (LMDB meeting a cache file
    # truncated under it is a SIGBUS): its Python traceback goes to stderr, which
    # cafs.mount_helper opened as CACHE/mountd.stderr, the one trace such a death leaves.
    faulthandler.enable()
    ready_pipe = os.fdopen(args.ready_fd, "w")

    def report(line: str) -> bool:
        """Whether ``line`` reached the helper (EPIPE: it is gone)."""
        try:
            ready_pipe.write(line + "\n")
            ready_pipe.close()
            return True
        except OSError:
            return False

    try:
        opts = parse_options(args.options)
    except CafsError as exc:
        report(f"error: {exc}")
        return 1

    def fail(message: str) -> None:
        report(f"error: {message}")  # unheard if the helper is gone: nothing is mounted either way

    return serve(args.source, args.mountpoint, opts, foreground=False, ready=lambda: report("ok"), fail=fail)


if __name__ == "__main__":
    sys.exit(main())

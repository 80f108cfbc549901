"""``mount.cafs SOURCE MOUNTPOINT [-o OPTIONS] [-f]``: mount(8)'s helper, and ``cafs mount``.

It checks what it can before mounting (options, mountpoint, repository, snapshot), so
each mistake gets one clear line and nothing is left half-made; then it starts the
daemon (``cafs.mountd``) in a new session and returns only once the daemon reports
that the filesystem answers. A daemon that fails says why; the last lines it wrote to its
stderr (``CACHE/mountd.stderr``) are added, since libfuse gives its reason only there
(fusermount3's, for a user other than root: a mountpoint not theirs, a ``/dev/fuse``
they may not open, ``allow_other`` not allowed in ``/etc/fuse.conf``). Interrupted
(Ctrl-C) while it waits, it kills the daemon and says nothing was mounted, so no mount
comes up behind its back; a daemon whose helper was killed unmounts once it is up
(``cafs.mountd``). ``-f`` serves in the foreground instead. From the busy check until the
mount answers it holds a lock on the mountpoint directory, so of several mounts started
at once on one mountpoint exactly one is made; the others wait for it, then fail as busy
(``mountpoint_locked``).

Started with standard input, output or error closed (a launcher that closes them), it
opens /dev/null in their place first, so that no file it opens takes their numbers.

mount(8) also passes ``-n``, ``-s`` and ``-v``; they are accepted and ignored. Note that
for mount(8) helpers ``-f`` usually means "fake"; for cafs it means foreground, as for
other FUSE filesystems, so ``mount -f -t cafs`` is not supported.

Exit codes follow mount(8): 0 mounted; 1 incorrect invocation; 32 mount failure.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cafs import cachedir
from cafs.errors import CafsError, OtherRepository, StoreError, UsageError
from cafs.fileio import CWD_GONE, cwd_gone
from cafs.metacache import default_cache_dir
from cafs.mountd import serve, why_not
from cafs.mountopts import OPTIONS_HELP, MountOptions, format_options, parse_options
from cafs.mounttable import CAFS_FSTYPE, top_mount
from cafs.naming import find_snapshot, parse_spec
from cafs.repository import Repository

EXIT_USAGE = 1
EXIT_FAILURE = 32
READY_MARGIN = 30.0  # seconds for the daemon's own start: Python, the caches, the kernel mount
STARTUP_READS = 3  # store reads before a daemon answers: config, the ref's journal list, its entry
EXIT_GRACE = 5.0  # seconds a failed daemon gets to exit before it is killed
SAID_LINES = 3  # lines of what a failed daemon wrote to its stderr, added to the message
SAID_BYTES = 2048


class MountError(CafsError):
    """The mount could not be made."""


@contextmanager
def mountpoint_locked(mountpoint: Path) -> Iterator[Callable[[], None]]:
    """Hold an exclusive flock on the directory at ``mountpoint`` for the block, or until
    the function it yields is called.

    Held from the busy check until the mount answers, it makes that check race-free: two
    mounts started at once both open the directory beneath before either has mounted, so
    the second waits here until the first is up (or has failed) and then finds the
    mountpoint busy; a mount started later opens the mounted root, and finds it busy too.
    The kernel drops the lock of a helper that dies, so it is never stale."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: mountpoint does not exist") from None
    except NotADirectoryError:
        raise MountError(f"{mountpoint}: mountpoint is not a directory") from None
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot use as mountpoint ({exc.strerror}); "
                         "if it is a dead mount, run: fusermount3 -u " + str(mountpoint)) from None
    open_fds = [fd]

    def release() -> None:
        while open_fds:
            os.close(open_fds.pop())

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield release
    finally:
        release()


def check_mountpoint(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        raise MountError(f"{mountpoint}: mountpoint is busy (something is mounted there already)")


def check_paths(mountpoint: Path, opts: MountOptions) -> None:
    """Refuse a cache directory or log file inside the mountpoint: the daemon opens them
    before it mounts, so they would be the directory beneath, hidden by the mount, while
    each new cache file would be looked for in the read-only mount itself (every chunk
    then fails to be cached, with a warning every 30 s)."""
    top = os.path.realpath(mountpoint)
    paths = [(f"cache={opts.cache}" if opts.cache else "the cache directory",
              opts.cache or default_cache_dir(dict(os.environ)))]
    if opts.log is not None and opts.log != "syslog":
        paths.append((f"log={opts.log}", Path(opts.log)))
    for what, path in paths:
        real = os.path.realpath(path)
        if os.path.commonpath([real, top]) == top:
            raise UsageError(f"{what} is inside the mountpoint {mountpoint}; put it outside")


def check_source(source: str, opts: MountOptions) -> None:
    spec = parse_spec(source)
    if spec.path:
        raise UsageError(f"{source}: mount a snapshot (REPO#NAME), not a path inside one")
    repo = Repository.at(spec.repo, mirrors=opts.mirrors, deadline=opts.timeout)
    find_snapshot(repo, spec.selector)
    for mirror in repo.mirrors:
        try:
            mirror.check()
        except OtherRepository as exc:  # another repository, or none: a mistake to name now
            raise UsageError(str(exc)) from None
        except StoreError:
            pass  # down now: read once it is back (and found to hold this repository)


def ready_timeout(opts: MountOptions) -> float:
    """How long to wait for the daemon to answer. It reads again what ``check_source``
    read, and each read may take up to ``timeout=`` (retries included) on a store that
    is slow to come back, so a longer ``timeout`` must mean a longer wait, or a mount
    that would have come up is given up. (A snapshot named by root id reads every
    journal entry: on a store that slow, name it REF@JID.)"""
    return READY_MARGIN + STARTUP_READS * opts.timeout


def spawn_daemon(source: str, mountpoint: Path, opts: MountOptions) -> None:
    cache_dir = opts.cache or default_cache_dir(dict(os.environ))
    try:
        cachedir.shared(cache_dir)
    except OSError as exc:
        raise MountError(f"cache directory {cache_dir}: cannot use it: {why_not(exc)}") from None
    try:
        err = cachedir.open_own(cache_dir / "mountd.stderr", os.O_RDWR | os.O_APPEND)
    except OSError as exc:
        raise MountError(f"{cache_dir / 'mountd.stderr'}: cannot write the daemon's stderr there: "
                         f"{why_not(exc)}") from None
    try:
        _spawn(source, mountpoint, opts, cache_dir, err)
    finally:
        os.close(err)


def _spawn(source: str, mountpoint: Path, opts: MountOptions, cache_dir: Path, err: int) -> None:
    start = os.fstat(err).st_size  # what the daemon writes to its stderr comes after this
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(
            # "--": a SOURCE may start with "-" (a relative repository path), and
            # would be taken for an option
            [sys.executable, "-m", "cafs.mountd", "--ready-fd", str(write_fd), "-o", format_options(opts),
             "--", source, str(mountpoint)],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True, close_fds=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    try:
        message = _read_line(read_fd, ready_timeout(opts))
    except BaseException:  # interrupted (Ctrl-C): no mount is to come up after the helper is gone
        proc.kill()  # auto_unmount unmounts what it may have mounted already
        proc.wait()
        raise
    finally:
        os.close(read_fd)
    if message == "ok":
        return
    if message is not None:  # a daemon that said why, or closed the pipe, is on its way out
        try:
            proc.wait(timeout=EXIT_GRACE)  # for its own exit status
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if message is None:
        raise MountError(f"{mountpoint}: the mount daemon did not answer within {ready_timeout(opts):.0f} s "
                         f"(see {cache_dir / 'mountd.stderr'})")
    if not message:
        raise MountError(f"{mountpoint}: the mount daemon exited (status {proc.returncode}); "
                         f"see {cache_dir / 'mountd.stderr'}")
    said = _said(err, start)
    # libfuse says why a mount failed only on stderr ("fuse_session_mount failed" is all
    # pyfuse3 raises), and fusermount3's reason is the one a user can act on
    raise MountError(message.removeprefix("error: ") + (f" ({said})" if said else ""))


def _said(fd: int, start: int) -> str:
    """The last lines written to the file at ``fd`` after offset ``start``, for a message."""
    end = os.fstat(fd).st_size
    offset = max(start, end - SAID_BYTES)
    text = os.pread(fd, end - offset, offset).decode(errors="replace")
    return "; ".join([line.strip() for line in text.splitlines() if line.strip()][-SAID_LINES:])


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to ``fd``; "" at end of file; None on timeout."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").split("\n", 1)[0]


def open_standard_fds() -> None:
    """Open /dev/null on whichever of descriptors 0, 1 and 2 is closed (a helper started
    with ``<&- >&-``, or by a launcher that closes them). Left closed, the next file
    opened takes the number: the daemon's ready pipe became descriptor 1, the daemon's
    standard output (/dev/null) replaced it in the child, and a mount that came up was
    reported failed and killed; libfuse's and Python's messages to fd 2 would have gone
    into whatever file held that number."""
    while True:
        fd = os.open(os.devnull, os.O_RDWR)
        if fd > 2:
            os.close(fd)
            return


def mount(source: str, mountpoint: str, options: str, *, foreground: bool) -> int:
    def fail(msg: str) -> None:
        print(f"mount.cafs: {msg}", file=sys.stderr)

    open_standard_fds()
    try:
        opts = parse_options(options)
        mnt = Path(mountpoint).absolute()
        check_paths(mnt, opts)
        with mountpoint_locked(mnt) as release:
            check_mountpoint(mnt)
            check_source(source, opts)
            if foreground:
                def up() -> bool:
                    release()
                    return True  # this process serves: there is nobody else to tell

                return serve(source, str(mnt), opts, foreground=True, ready=up, fail=fail)
            spawn_daemon(source, mnt, opts)
    except UsageError as exc:
        fail(str(exc))
        return EXIT_USAGE
    except CafsError as exc:
        fail(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        fail("interrupted; nothing was mounted")
        return EXIT_FAILURE
    except OSError as exc:
        if exc.filename is None and cwd_gone():  # os.getcwd() for a relative path
            fail(CWD_GONE)
            return EXIT_USAGE
        raise
    return 0


def unmount(mountpoint: str) -> None:
    """Unmount the cafs mount at ``mountpoint``: fusermount3 -u, or umount(8) where that
    is missing. Raises ``MountError`` if no cafs mount is there (for root, fusermount3
    unmounts any filesystem: a tmpfs and its files would be gone) or it cannot be
    unmounted."""
    path = os.path.realpath(mountpoint)  # as the kernel names it; a dead mount is not followed
    top = top_mount(path)
    if top is None:
        raise MountError(f"{mountpoint}: {'not mounted' if os.path.lexists(path) else 'no such directory'}")
    if top.fstype != CAFS_FSTYPE:
        raise MountError(f"{mountpoint}: not a cafs mount ({top.fstype} is mounted there); nothing unmounted")
    tool = shutil.which("fusermount3")
    cmd = [tool, "-u", path] if tool else ["umount", path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        if os.geteuid() != 0 and top.user_id is not None and top.user_id != os.geteuid():
            # fusermount3 says "entry for ... not found in /etc/mtab"
            raise MountError(f"cannot unmount {mountpoint}: it was mounted by uid {top.user_id}; "
                             "only that user or root can unmount it")
        raise MountError(f"cannot unmount {mountpoint}: {result.stderr.strip()}")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="mount a cafs snapshot read-only",
                                epilog="exit status: 0 mounted, 1 bad usage, 32 mount failure")
    p.add_argument("source", metavar="SOURCE", help="REPO#NAME, REPO#NAME@JID or REPO#ROOTID")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS", help=OPTIONS_HELP)
    p.add_argument("-f", dest="foreground", action="store_true",
                   help="stay in the foreground, logging to stderr (not mount(8)'s 'fake')")
    p.add_argument("-n", "-s", "-v", dest="ignored", action="count", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("mount.cafs")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else 0
    return mount(args.source, args.mountpoint, ",".join(args.options), foreground=args.foreground)


if __name__ == "__main__":
    sys.exit(main())

"""Real cafs mounts for tests: mount, always unmount, wait for the daemon, sweep leftovers.

Contract:

- ``mounted(source, mnt, options)`` is a context manager: it runs ``mount.cafs`` (``python
  -m cafs.mount_helper``) as a subprocess, yields a ``Mount`` (mountpoint and the daemon's
  PID, read from ``user.cafs.pid``), and in ``finally`` unmounts with ``fusermount3 -u``;
  if that fails (busy, or a daemon that does not answer) it kills the daemon with SIGKILL
  and detaches with ``fusermount3 -uz``. Then it waits for the daemon to exit (polling
  ``/proc/PID`` with a deadline) and, unless ``expect_warnings``, checks the lines this
  mount added to its log (``MNT.log`` unless ``log=`` is given) for WARNING and ERROR.
  A mount the test already ended (SIGTERM, kill -9, ``cafs umount``) is not unmounted
  twice.
- ``cafs_mounts(under)`` lists the ``fuse.cafs`` mounts in ``/proc/mounts`` (mountpoints
  decoded from its octal escapes); ``sweep_mounts(under)`` unmounts every one of them below
  ``under`` the same way, finding each daemon by its command line (never touching the
  mountpoint, which may not answer). The session fixture in ``conftest.py`` calls it.
- ``run_cafs`` and ``run_mount_helper`` run the commands as subprocesses with this
  checkout first on ``PYTHONPATH``; ``make_repo`` and ``import_tree`` build repositories.

Processes are only ever stopped by PID, and only after checking that the PID still
belongs to a ``cafs.mountd`` process. No sleeps but polling with a deadline.

Raises ``AssertionError`` when a mount fails, when a daemon does not exit in time, or
when a mount's log holds unexpected warnings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SRC_ROOT = str(Path(__file__).resolve().parents[1])
FUSERMOUNT = "fusermount3"
EXIT_DEADLINE = 30.0  # seconds for a daemon to exit after its unmount
POLL = 0.02
SMALL_CHUNKS = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K")


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = SRC_ROOT + (os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else "")
    out.update(extra)
    return out


def run_cafs(*args: str | os.PathLike[str], cache: Path, timeout: float = 300,
             **kw: Any) -> subprocess.CompletedProcess[str]:
    """``cafs ARGS`` as a subprocess, with ``CAFS_CACHE_DIR=cache``."""
    return subprocess.run([sys.executable, "-m", "cafs.cli", *(os.fspath(a) for a in args)],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env=env(CAFS_CACHE_DIR=str(cache)), **kw)


def kill_cafs_when(args: Sequence[str | os.PathLike[str]], condition: Callable[[], bool], what: str) -> int:
    """``cafs ARGS`` as a subprocess, ``kill -9``-ed as soon as ``condition()`` holds; its
    exit status: 0 if it finished first, ``-SIGKILL`` if killed (any other fails, with its
    stderr). The commands tests interrupt take a fraction of a second, so the poll does
    not sleep; ``what`` names the condition if it never holds within a minute."""
    proc = subprocess.Popen([sys.executable, "-m", "cafs.cli", *(os.fspath(a) for a in args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None and not condition():
            assert time.monotonic() < deadline, f"{what} never came"
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        _out, err = proc.communicate()
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()
    return proc.returncode


def run_mount_helper(source: str, mnt: Path | str, options: str | None = None, *,
                     timeout: float = 120, open_files: int | None = None, address_space: int | None = None,
                     cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``mount.cafs SOURCE MNT -o OPTIONS`` (run in ``cwd`` if given); with ``open_files``,
    under soft and hard limits of that many open files (as after 'ulimit -n N'), with
    ``address_space``, of that many bytes of address space ('ulimit -v'), which the
    daemon inherits."""
    args = [sys.executable, "-m", "cafs.mount_helper", source, os.fspath(mnt)]
    if open_files is not None:
        args = ["prlimit", f"--nofile={open_files}:{open_files}", "--", *args]
    if address_space is not None:
        args = ["prlimit", f"--as={address_space}:{address_space}", "--", *args]
    if options is not None:
        args += ["-o", options]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=cwd)


def make_repo(path: Path, cache: Path, *, pack_size: str = "512K",
              chunking: tuple[str, ...] = SMALL_CHUNKS) -> Path:
    r = run_cafs("init", path, *chunking, "--pack-size", pack_size, cache=cache)
    assert r.returncode == 0, r.stderr
    return path


def import_tree(src: Path, repo: Path, name: str, cache: Path) -> str:
    """Import ``src`` as ``name``; returns ``REPO#NAME``."""
    r = run_cafs("import", src, repo, "--name", name, "--no-progress", cache=cache)
    assert r.returncode == 0, r.stderr
    return f"{repo}#{name}"


# -- /proc ------------------------------------------------------------------------------

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """A /proc/mounts field with its octal escapes (space, tab, newline, backslash, #) undone."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


@dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: str
    fstype: str
    options: str


def cafs_mounts(under: Path | str | None = None) -> list[MountEntry]:
    """The ``fuse.cafs`` mounts in /proc/mounts, those at or below ``under`` if given."""
    out = []
    prefix = os.fspath(under).rstrip("/") if under is not None else None
    with open("/proc/mounts", "rb") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 4 or fields[2] != b"fuse.cafs":
                continue
            entry = MountEntry(_unescape(fields[0]), _unescape(fields[1]), fields[2].decode(),
                               fields[3].decode())
            mp = entry.mountpoint
            if prefix is None or mp == prefix or mp.startswith(prefix + "/"):
                out.append(entry)
    return out


def is_mounted(mnt: Path | str) -> bool:
    return bool([m for m in cafs_mounts() if m.mountpoint == os.fspath(mnt)])


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def is_mountd(pid: int) -> bool:
    """Whether ``pid`` is a cafs mount daemon (guards against PID reuse before a kill)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"cafs.mountd" in f.read().split(b"\0")
    except OSError:
        return False


def mountd_pids(mnt: Path | str) -> list[int]:
    """Daemons whose command line names ``mnt`` as their mountpoint, found without
    touching the mountpoint."""
    want = os.fsencode(os.fspath(mnt))
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"cafs.mountd" in args and want in args:
            pids.append(int(name))
    return pids


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``condition()`` holds; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def wait_exit(pid: int, timeout: float = EXIT_DEADLINE) -> None:
    """Wait for ``pid`` to exit; one that does not is killed, then AssertionError."""
    try:
        poll(lambda: not process_alive(pid), timeout, f"mount daemon {pid} to exit")
    except AssertionError:
        kill_daemon(pid)
        raise


def kill_daemon(pid: int) -> None:
    if is_mountd(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- mounting ---------------------------------------------------------------------------

@dataclass
class Mount:
    path: Path
    pid: int
    log: Path
    log_start: int = 0  # where this mount's lines begin in ``log`` (remounts append)

    def stats(self) -> dict[str, int]:
        return dict(json.loads(os.getxattr(self.path, "user.cafs.stats")))

    def log_problems(self) -> list[str]:
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_start)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]


def unmount(mnt: Path | str, pids: list[int]) -> None:
    """Unmount ``mnt`` if mounted (fusermount3 -u; else SIGKILL ``pids`` and
    fusermount3 -uz), then wait for ``pids`` to exit."""
    if is_mounted(mnt):
        r = subprocess.run([FUSERMOUNT, "-u", os.fspath(mnt)], check=False, capture_output=True,
                           timeout=60)
        if r.returncode != 0:
            for pid in pids:
                kill_daemon(pid)
            if is_mounted(mnt):
                subprocess.run([FUSERMOUNT, "-uz", os.fspath(mnt)], check=False,
                               capture_output=True, timeout=60)
    for pid in pids:
        wait_exit(pid)


def _diagnostics(mnt: Path, log: Path, cache: Path | None) -> str:
    parts = []
    for path in (log, cache / "mountd.stderr" if cache else None):
        if path is not None and path.exists():
            parts.append(f"--- {path}:\n{path.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


def _option(options: str, key: str) -> str | None:
    for item in options.split(","):
        k, _, v = item.partition("=")
        if k == key:
            return v
    return None


@contextmanager
def mounted(source: str, mnt: Path, options: str = "", *, expect_warnings: bool = False,
            open_files: int | None = None, address_space: int | None = None,
            cwd: Path | None = None) -> Iterator[Mount]:
    """Mount ``source`` at ``mnt`` with ``mount.cafs -o options``; always unmount.

    Unless ``options`` names a ``log=``, the daemon logs to ``MNT.log`` beside the
    mountpoint (not to syslog), so each mount's log can be checked on its own."""
    mnt = Path(mnt)
    log = Path(_option(options, "log") or f"{mnt}.log")
    if _option(options, "log") is None:
        options = ",".join(o for o in (options, f"log={log}") if o)
    cache = _option(options, "cache")
    log_start = log.stat().st_size if log.exists() else 0
    r = run_mount_helper(source, mnt, options, open_files=open_files, address_space=address_space, cwd=cwd)
    pids: list[int] = []
    try:
        why = _diagnostics(mnt, log, Path(cache) if cache else None)
        assert r.returncode == 0, \
            f"mount.cafs {source} {mnt} -o {options}: exit {r.returncode}\n{r.stderr}{why}"
        pids = [int(os.getxattr(mnt, "user.cafs.pid"))]
        m = Mount(mnt, pids[0], log, log_start)
        yield m
    finally:
        if not pids:
            pids = mountd_pids(mnt)
        unmount(mnt, pids)
    if not expect_warnings:
        problems = m.log_problems()
        assert not problems, f"{mnt}: unexpected lines in the mount's log:\n" + "\n".join(problems)


def sweep_mounts(under: Path | str) -> list[str]:
    """Unmount every cafs mount below ``under`` and wait for its daemon; returns the
    mountpoints that were found."""
    found = []
    for entry in cafs_mounts(under):
        found.append(entry.mountpoint)
        unmount(entry.mountpoint, mountd_pids(entry.mountpoint))
    return found

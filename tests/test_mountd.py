"""The mount daemon's process set-up: glibc's malloc arenas are capped; logs go where
the options say, or the mount is refused; it finds its own mount in the mount table."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cafs.errors import CafsError, UsageError
from cafs.mountd import setup_logging
from cafs.mountopts import parse_options
from cafs.mounttable import MountEntry, mounted_at

# Threads allocate at once; glibc's own report (malloc_info) counts the arenas in use.
_PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, os, sys, tempfile, threading
    from cafs.mountd import limit_malloc_arenas
    if sys.argv[1] == "limit":
        assert limit_malloc_arenas(1)
    barrier = threading.Barrier(8)
    def churn():
        barrier.wait()
        for _ in range(5000):
            [bytearray(512) for _ in range(8)]
    threads = [threading.Thread(target=churn) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "info.xml")
        f = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, f)
        libc.fclose(f)
        print(open(path).read().count("<heap nr="))
""")


def arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120)
    return int(out.stdout)


def test_the_arena_cap_holds_while_threads_allocate_at_once() -> None:
    assert arenas("limit") == 1


def test_without_the_cap_threads_get_arenas_of_their_own() -> None:
    # shows the probe can see more than one arena, so the test above can fail
    assert arenas("free") > 1


@pytest.fixture
def cafs_logger():
    logger = logging.getLogger("cafs")
    before = list(logger.handlers)
    yield logger
    for h in logger.handlers[len(before):]:
        logger.removeHandler(h)
        h.close()


def test_log_syslog_without_a_daemon_is_refused(tmp_path: Path, cafs_logger: logging.Logger) -> None:
    # SysLogHandler takes a socket nobody listens on without a word: every line was lost
    opts = parse_options("log=syslog")
    with pytest.raises(CafsError, match=f"log=syslog: no syslog daemon listens on {tmp_path}/log"):
        setup_logging(opts, tmp_path, False, syslog_socket=str(tmp_path / "log"))
    setup_logging(parse_options(""), tmp_path, False, syslog_socket=str(tmp_path / "log"))  # default: a file
    logging.getLogger("cafs.mount").warning("to the file")
    assert "to the file" in (tmp_path / "mount.log").read_text()


def test_log_syslog_reaches_a_listening_daemon(tmp_path: Path, cafs_logger: logging.Logger) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(str(tmp_path / "log"))
        daemon.settimeout(5)
        setup_logging(parse_options("log=syslog"), tmp_path, False, syslog_socket=str(tmp_path / "log"))
        logging.getLogger("cafs.mount").warning("to syslog")
        assert b"to syslog" in daemon.recv(4096)


def test_a_log_that_cannot_be_written_is_said_once_not_for_every_line(
        tmp_path: Path, cafs_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    # log=FILE on a full disk: each line logged printed logging's traceback, some 2 KB,
    # to the daemon's stderr (CACHE/mountd.stderr, on another disk)
    setup_logging(parse_options("log=/dev/full"), tmp_path, False, syslog_socket=str(tmp_path / "log"))
    for n in range(5):
        logging.getLogger("cafs.mount").warning("line %d", n)
    err = capsys.readouterr().err
    assert err.count("cannot write the log /dev/full: [Errno 28] No space left on device") == 1, err
    assert "Traceback" not in err and "Logging error" not in err, err


def test_exec_and_noexec_the_last_given_wins() -> None:
    # as mount(8) takes them: fstab's "user" implies noexec, and "user,exec" undoes it
    assert parse_options("noexec").noexec and not parse_options("").noexec
    assert not parse_options("noexec,exec").noexec
    assert parse_options("exec,cache_size=1G,noexec").noexec


def test_remount_is_refused_saying_what_to_do() -> None:
    # 'mount -t cafs -o remount,ro SOURCE DIR' reached the helper and was told
    # "unknown mount option 'remount'", as if mount(8) had not heard of it
    with pytest.raises(UsageError, match="remount: not supported .* unmount and mount again"):
        parse_options("remount,ro")


# A mountinfo table: mount id, parent id, device; "/a" was mounted after "/a/b".
_ROOT = MountEntry("/", "ext4", 1, 10, 1)
_CAFS = MountEntry("/a/b", "fuse.cafs", 5, 11, 10)


@pytest.mark.parametrize("table, where", [
    ([_ROOT, _CAFS], "/a/b"),
    ([_ROOT, _CAFS, MountEntry("/a/b/c", "tmpfs", 6, 12, 11)], "/a/b"),  # a mount inside it
    ([_ROOT, _CAFS, MountEntry("/a/b", "tmpfs", 6, 12, 11)], None),  # one on its path
    ([_ROOT, _CAFS, MountEntry("/a", "tmpfs", 6, 12, 10)], None),  # one on a directory above
    ([_CAFS], "/a/b"),  # a chroot to a plain directory: no root mount in the table
], ids=["on top", "a mount inside", "covered on its path", "covered above", "no root mount"])
def test_a_mount_is_where_a_lookup_of_its_path_reaches_it(table: list[MountEntry], where: str | None) -> None:
    assert mounted_at(5, table) == where

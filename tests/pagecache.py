"""How much of a file the page cache holds, from util-linux's fincore."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

needs_fincore = pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")


def resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def skip_unless_observable(directory: Path) -> None:
    """Skip the test where a freshly written file does not show in the page cache (tmpfs
    counts differently, some filesystems bypass the cache)."""
    control = directory / "page-cache-control"
    control.write_bytes(os.urandom(4 << 20))
    try:
        if resident_bytes(control) == 0:
            pytest.skip("page cache residency is not observable on this filesystem")
    finally:
        control.unlink()


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def evict_settled(paths: list[Path], seconds: float = 10.0) -> None:
    """Evict ``paths`` until none shows a page: readahead an earlier test started (an
    open's ``POSIX_FADV_WILLNEED``) may bring pages back after a first eviction."""
    deadline = time.monotonic() + seconds
    while True:
        for path in paths:
            evict(path)
        if sum(map(resident_bytes, paths)) == 0:
            return
        assert time.monotonic() < deadline, f"pages of {paths} stay in the page cache"
        time.sleep(0.05)


def skip_unless_nowait_reads(directory: Path) -> None:
    """Skip the test where reads that must not wait for the disk (``RWF_NOWAIT``) are
    refused, or where a file dropped from the page cache does not show it."""
    skip_unless_observable(directory)
    control = directory / "nowait-control"
    control.write_bytes(os.urandom(1 << 20))
    try:
        fd = os.open(control, os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        except OSError as exc:
            pytest.skip(f"reads with RWF_NOWAIT fail here: {exc}")
        finally:
            os.close(fd)
        evict(control)
        if resident_bytes(control):
            pytest.skip("POSIX_FADV_DONTNEED does not empty the page cache here")
    finally:
        control.unlink()

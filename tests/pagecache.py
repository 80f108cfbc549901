"""How much of a file the page cache holds, from util-linux's fincore."""

from __future__ import annotations

import os
import shutil
import subprocess
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

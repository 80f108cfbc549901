"""Counting a process's open descriptors on the files of one directory tree."""

from __future__ import annotations

import os
from pathlib import Path


def open_below(root: Path) -> int:
    """How many of this process's descriptors are open on files below ``root``. A test
    counts those, not all: threads that earlier tests left open and close descriptors
    of their own at any moment."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since it was listed
        count += target.startswith(f"{root}/")
    return count

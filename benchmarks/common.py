"""Helpers every benchmark script uses: sizes on the command line and in reports, and
compiling cafs before anything is timed.

The scripts run from this directory (``.venv/bin/python benchmarks/X.py``), which is then
``sys.path[0]``, so ``from common import ...`` finds this module.
"""

from __future__ import annotations

import argparse
import compileall
import re
from pathlib import Path

_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)(i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256M``, ``2G``, ``1.5GiB``, ``4096``: powers of 1024."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 256M, 2G)")
    return int(float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2).upper() or " "))))


def compile_cafs() -> None:
    """Write the bytecode of cafs's modules before anything is timed. With
    PYTHONDONTWRITEBYTECODE set, every timed command would otherwise compile each module
    changed since its last .pyc, which an installed cafs never does."""
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "cafs", quiet=1)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)

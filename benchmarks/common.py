"""Helpers every benchmark script uses: sizes on the command line and in reports.

The scripts run from this directory (``.venv/bin/python benchmarks/X.py``), which is then
``sys.path[0]``, so ``from common import ...`` finds this module.
"""

from __future__ import annotations

import argparse
import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)(i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256M``, ``2G``, ``1.5GiB``, ``4096``: powers of 1024."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 256M, 2G)")
    return int(float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2).upper() or " "))))


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)

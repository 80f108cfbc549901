"""Sizes as users write them: ``4096``, ``256K``, ``64M``, ``1G``, ``2TiB`` (powers of 1024);
and seconds: a number above 0, finite (``nan`` and ``inf`` break the waits they bound)."""

from __future__ import annotations

import math
import re

_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names; ValueError if it names none."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 256K, 64M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def parse_seconds(text: str, most: float = math.inf) -> float:
    """The seconds ``text`` names, above 0, finite and at most ``most``; ValueError if
    it names none."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf and seconds <= most):
        raise ValueError(f"{text!r} is not a number of seconds above 0" + (f" and at most {most:.0f}" if most < math.inf else ""))
    return seconds

"""Sizes as users write them: ``4096``, ``256K``, ``64M``, ``1G``, ``2TiB`` (powers of 1024)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names; ValueError if it names none."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 256K, 64M, 1G)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))

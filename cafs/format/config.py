"""The repository config: the object ``config``, UTF-8 JSON, written once by ``cafs init``.

    {"format": "cafs", "version": 3, "repo_id": "<64 hex digits>",
     "chunker": {"min_size": int, "avg_size": int, "max_size": int},
     "pack_size": int}

``version`` is ``FORMAT_VERSION`` (3) when written; a reader takes any of
``READABLE_VERSIONS`` and refuses others (a newer one with the advice to upgrade), so
that every command stops at the config before it reads or writes anything else. ``chunker`` holds the
FastCDC parameters every import into the repository uses (same parameters, same cut
points, so dedup works across imports). ``pack_size`` is the target pack size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cafs.errors import RepositoryError
from cafs.format import FORMAT_VERSION, READABLE_VERSIONS
from cafs.format.location import MAX_CHUNK

MAX_CONFIG_BYTES = 64 << 10
# pyfastcdc's accepted ranges
MIN_SIZE_RANGE = (64, 1 << 20)
AVG_SIZE_RANGE = (256, 4 << 20)
MAX_SIZE_RANGE = (1024, 16 << 20)
PACK_SIZE_RANGE = (64 << 10, 4 << 30)


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    min_size: int = 256 << 10
    avg_size: int = 1 << 20
    max_size: int = 4 << 20


@dataclass(frozen=True, slots=True)
class RepoConfig:
    repo_id: str
    chunker: ChunkerParams = ChunkerParams()
    pack_size: int = 64 << 20
    version: int = FORMAT_VERSION


def check_config(c: RepoConfig) -> RepoConfig:
    """Return ``c`` if its parameters are usable, else raise RepositoryError saying why."""
    p = c.chunker
    for label, value, (lo, hi) in (
        ("chunk min size", p.min_size, MIN_SIZE_RANGE),
        ("chunk avg size", p.avg_size, AVG_SIZE_RANGE),
        ("chunk max size", p.max_size, MAX_SIZE_RANGE),
        ("pack size", c.pack_size, PACK_SIZE_RANGE),
    ):
        if not lo <= value <= hi:
            raise RepositoryError(f"{label} {value} is outside [{lo}, {hi}]")
    if not p.min_size <= p.avg_size <= p.max_size <= MAX_CHUNK:
        raise RepositoryError(f"chunk sizes must satisfy min <= avg <= max, got {p.min_size}/{p.avg_size}/{p.max_size}")
    if len(c.repo_id) != 64 or any(ch not in "0123456789abcdef" for ch in c.repo_id):
        raise RepositoryError(f"repo_id {c.repo_id[:80]!r} is not 64 hex digits")
    return c


def encode_config(c: RepoConfig) -> bytes:
    doc = {"format": "cafs", "version": c.version, "repo_id": c.repo_id,
           "chunker": {"min_size": c.chunker.min_size, "avg_size": c.chunker.avg_size,
                       "max_size": c.chunker.max_size},
           "pack_size": c.pack_size}
    return (json.dumps(doc, indent=2) + "\n").encode()


def decode_config(data: bytes, where: str) -> RepoConfig:
    def bad(why: str) -> RepositoryError:
        return RepositoryError(f"{where}: not a cafs repository config ({why})")

    if len(data) > MAX_CONFIG_BYTES:
        raise bad("too large")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != "cafs":
        raise bad("no 'format': 'cafs'")
    version = doc.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # true == 1 in Python
        newer = type(version) is int and version > FORMAT_VERSION
        raise RepositoryError(f"{where}: repository format version {doc.get('version')!r}; this cafs reads versions "
                              + ", ".join(map(str, READABLE_VERSIONS))
                              + ("; a newer cafs made it: upgrade cafs on this host to use it" if newer else ""))
    try:
        ch = doc["chunker"]
        config = RepoConfig(
            repo_id=str(doc["repo_id"]),
            chunker=ChunkerParams(int(ch["min_size"]), int(ch["avg_size"]), int(ch["max_size"])),
            pack_size=int(doc["pack_size"]),
            version=version,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"missing or malformed field {exc}") from None
    try:
        return check_config(config)
    except RepositoryError as exc:
        raise bad(str(exc)) from None

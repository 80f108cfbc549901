"""Ref journals: the snapshots of a ref, one immutable object per snapshot.

A ref NAME's journal is the set of objects ``refs/NAME/<jid as 20 decimal digits>``;
jids grow (a new snapshot takes the largest jid + 1) and the newest is the largest.
Writing a journal entry is the single commit point of an import. Each object is a body
followed by its BLAKE3 digest (32 bytes), the body being

    msgpack {"v": 2, "jid": int, "time_ns": int, "root": <root entry>,
             "host": str, "source": bytes, "stats": {str: int}}

where ``root`` is a directory entry (see nodes) with an empty name; its location names
the snapshot's root node, whose id is the snapshot's root id. The digest covers what no
id does (the root's mode, owner and mtime, the time, host, source and stats): an entry
whose digest does not match is damaged and refused. Version 1 entries (format version
1) are the body alone, with ``"v": 1``, and are read as they are; a commit into a
repository whose config says version 1 writes them so (``journal_version``), since the
cafs that made it reads no other.

Ref names are 1-100 characters of ``[A-Za-z0-9._-]``, not starting with ``.`` or ``-``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cafs.errors import FormatError, RefError
from cafs.format import JOURNAL_CHECKSUM_SINCE
from cafs.format.nodes import Entry, decode_entry
from cafs.format.strict import expect_bytes, expect_int, expect_map, expect_str, pack, unpack
from cafs.ids import digest

JOURNAL_VERSION = 2
CHECKSUM_LEN = 32
JID_DIGITS = 20
MAX_JOURNAL_BYTES = 1 << 20
_REF_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")
_JID_KEY = re.compile(r"[0-9]{%d}" % JID_DIGITS)  # not str.isdigit: it takes '²', which int() refuses


def is_ref_name(name: str) -> bool:
    return _REF_NAME.fullmatch(name) is not None


def check_ref_name(name: str) -> str:
    if not is_ref_name(name):
        raise RefError(
            f"invalid ref name {name!r}: use 1-100 letters, digits, '.', '_' or '-' "
            "(no '/'), not starting with '.' or '-'"
        )
    return name


def journal_key(name: str, jid: int) -> str:
    return f"refs/{name}/{jid:0{JID_DIGITS}d}"


def latest_key(name: str) -> str:
    """The advisory pointer to a ref's newest jid, for stores that cannot list keys."""
    return f"refs/{name}/latest"


def encode_latest(jid: int) -> bytes:
    return f"{jid:0{JID_DIGITS}d}\n".encode()


def decode_latest(data: bytes) -> int | None:
    return parse_jid(data.strip().decode("ascii", "replace"))


def parse_jid(key_tail: str) -> int | None:
    if _JID_KEY.fullmatch(key_tail):
        return int(key_tail)
    return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    ref: str
    jid: int
    time_ns: int
    root: Entry
    host: str = ""
    source: bytes = b""
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def root_id(self) -> bytes:
        assert self.root.ref is not None
        return self.root.ref.id


def journal_version(format_version: int) -> int:
    """The journal entry version to write into a repository of ``format_version``: its
    readers may know no newer one."""
    return JOURNAL_VERSION if format_version >= JOURNAL_CHECKSUM_SINCE else 1


def encode_snapshot(s: Snapshot, version: int = JOURNAL_VERSION) -> bytes:
    body = pack({"v": version, "jid": s.jid, "time_ns": s.time_ns, "root": s.root.encode(),
                 "host": s.host, "source": s.source, "stats": s.stats})
    return body + digest(body) if version >= 2 else body


def decode_snapshot(data: bytes, ref: str, jid: int) -> Snapshot:
    what = f"journal entry {ref}@{jid}"
    checked = len(data) > CHECKSUM_LEN and digest(data[:-CHECKSUM_LEN]) == data[-CHECKSUM_LEN:]
    try:
        m = expect_map(unpack(data[:-CHECKSUM_LEN] if checked else data, what, max_bytes=MAX_JOURNAL_BYTES), what,
                       required={"v", "jid", "time_ns", "root", "host", "source", "stats"})
    except FormatError as exc:
        if checked:
            raise
        raise RefError(f"{what} is damaged: its checksum does not match and it is no version-1 entry ({exc})") from None
    if expect_int(m["v"], what + " version", lo=1, hi=JOURNAL_VERSION) > 1 and not checked:
        raise RefError(f"{what} is damaged: its checksum does not match")
    if expect_int(m["jid"], what + " jid") != jid:
        raise RefError(f"{what}: records jid {m['jid']}, its name says {jid}")
    stats = m["stats"]
    if not isinstance(stats, dict) or len(stats) > 64:
        raise RefError(f"{what}: stats is not a small map")
    return Snapshot(
        ref=ref,
        jid=jid,
        time_ns=expect_int(m["time_ns"], what + " time", lo=-(1 << 63)),
        root=decode_entry(m["root"], what + " root", root=True),
        host=expect_str(m["host"], what + " host", max_len=255),
        source=expect_bytes(m["source"], what + " source", max_len=4096),
        stats={expect_str(k, what + " stats", max_len=64): expect_int(v, what + " stats", lo=-(1 << 63)) for k, v in stats.items()},
    )

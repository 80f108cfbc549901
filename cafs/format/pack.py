"""Pack layout: many stored objects back to back, then a self-describing trailer.

    pack    := body trailer trailer_length magic
    body    := stored object bytes, back to back, in the order written
    trailer := msgpack [1, kind, body_digest, [[id, offset, stored_length, length, codec], ...]]
    trailer_length := u32 little-endian, the trailer's byte length
    magic   := b"CAFSPK1\\n"

``kind`` is 0 for a data pack (chunks) and 1 for a metadata pack (nodes).
``body_digest`` is the BLAKE3-256 of the body, so a whole pack can be checked without
knowing which snapshots use it. Entries are in offset order, do not overlap and lie
inside the body. The trailer lets a reader (resume after a crash, fsck, gc) learn a
pack's contents from the pack alone, with one ranged read of its tail. ``verify_pack``
checks every byte of a whole pack (repair and copy call it before writing a pack).

Pack names are random 32-byte ids, stored at ``packs/<first 2 hex digits>/<hex id>``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cafs.errors import IntegrityError
from cafs.format.location import Location, decode_pack_row, verify_stored
from cafs.format.strict import expect_bytes, expect_int, expect_list, fail, pack, unpack
from cafs.ids import digest

PACK_MAGIC = b"CAFSPK1\n"
PACK_VERSION = 1
KIND_DATA = 0
KIND_META = 1
TAIL_LEN = 4 + len(PACK_MAGIC)
MAX_TRAILER = 32 << 20
MAX_PACK_ENTRIES = 1 << 20


@dataclass(frozen=True, slots=True)
class PackTrailer:
    kind: int
    body_digest: bytes
    entries: tuple[Location, ...]  # each with .pack set to the pack's id

    @property
    def body_length(self) -> int:
        return self.entries[-1].end if self.entries else 0


def encode_trailer(kind: int, body_digest: bytes, entries: list[Location]) -> bytes:
    """The bytes to append to a pack body: trailer, its length and the magic."""
    rows = [[e.id, e.offset, e.stored_length, e.length, e.codec] for e in entries]
    trailer = pack([PACK_VERSION, kind, body_digest, rows])
    return trailer + struct.pack("<I", len(trailer)) + PACK_MAGIC


def trailer_length(tail: bytes, what: str) -> int:
    """The trailer length from the last ``TAIL_LEN`` bytes of a pack."""
    if len(tail) != TAIL_LEN or tail[4:] != PACK_MAGIC:
        fail(what, "does not end with the pack magic (truncated or not a pack)")
    (n,) = struct.unpack("<I", tail[:4])
    if n > MAX_TRAILER:
        fail(what, f"trailer length {n} is over the limit")
    return int(n)


def decode_trailer(data: bytes, pack_id: bytes, pack_length: int, what: str) -> PackTrailer:
    """Decode a trailer (without length and magic) of a pack of ``pack_length`` bytes."""
    top = expect_list(unpack(data, what, max_bytes=MAX_TRAILER), what, length=4)
    expect_int(top[0], what + " version", lo=PACK_VERSION, hi=PACK_VERSION)
    kind = expect_int(top[1], what + " kind", hi=KIND_META)
    body_digest = expect_bytes(top[2], what + " digest", min_len=32, max_len=32)
    rows = expect_list(top[3], what + " entries", max_len=MAX_PACK_ENTRIES)
    body_end = pack_length - len(data) - TAIL_LEN
    entries = []
    pos = 0
    for row in rows:
        loc = decode_pack_row(row, pack_id, what + " entry")
        if loc.offset < pos or loc.end > body_end:
            fail(what, f"entry at {loc.offset} overlaps or lies outside the body")
        pos = loc.end
        entries.append(loc)
    if pos != body_end:
        fail(what, f"entries end at {pos} but the body is {body_end} bytes")
    return PackTrailer(kind, body_digest, tuple(entries))


def trailer_of(data: bytes | memoryview, pack_id: bytes, what: str) -> PackTrailer:
    """The trailer at the end of the whole pack ``data``, nothing else checked. Raises
    FormatError (not a pack, a bad trailer)."""
    view = memoryview(data)
    n = trailer_length(bytes(view[-TAIL_LEN:]), what)
    if n > len(view) - TAIL_LEN:
        fail(what, f"trailer length {n} exceeds the pack")
    end = len(view) - TAIL_LEN
    return decode_trailer(bytes(view[end - n:end]), pack_id, len(view), what)


def verify_pack(data: bytes | memoryview, pack_id: bytes, what: str) -> PackTrailer:
    """The trailer of the whole pack ``data``, raising unless every byte checks out: the
    trailer decodes, the body digest matches, and every object matches its id.

    Raises FormatError (not a pack, a bad trailer) or IntegrityError (damaged bytes).
    """
    view = memoryview(data)
    trailer = trailer_of(view, pack_id, what)
    if digest(view[:trailer.body_length]) != trailer.body_digest:
        raise IntegrityError(f"{what}: body digest differs")
    for loc in trailer.entries:
        verify_stored(loc, view[loc.offset:loc.end])
    return trailer


def pack_key(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"

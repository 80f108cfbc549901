"""Index objects: what several packs hold, so a reader need not open every pack.

    index := msgpack [1, [[pack_id, pack_length, kind, [[id, offset, stored_length, length, codec], ...]], ...]]

An entry that ends past its pack's body (beyond ``pack_length - TAIL_LEN``) makes the
whole index object refused.

Stored at ``index/<hex BLAKE3 of the bytes>`` (content-addressed: a reader verifies it).
An import writes one index object covering the packs it wrote, before it commits the
ref. Packs that no index object covers (left by an interrupted import) are learned from
their trailers. Index objects are a cache of the trailers: losing one loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from cafs.format.location import decode_pack_row, Location
from cafs.format.pack import KIND_META, MAX_PACK_ENTRIES, TAIL_LEN
from cafs.format.strict import expect_bytes, expect_int, expect_list, fail, pack, unpack

INDEX_VERSION = 1
MAX_INDEX_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class PackSummary:
    pack_id: bytes
    length: int
    kind: int
    entries: tuple[Location, ...]


def encode_index(packs: list[PackSummary]) -> bytes:
    rows = [
        [p.pack_id, p.length, p.kind, [[e.id, e.offset, e.stored_length, e.length, e.codec] for e in p.entries]]
        for p in packs
    ]
    return pack([INDEX_VERSION, rows])


def decode_index(data: bytes, what: str = "index") -> list[PackSummary]:
    top = expect_list(unpack(data, what, max_bytes=MAX_INDEX_BYTES), what, length=2)
    expect_int(top[0], what + " version", lo=INDEX_VERSION, hi=INDEX_VERSION)
    out = []
    for row in expect_list(top[1], what + " packs"):
        f = expect_list(row, what + " pack", length=4)
        pack_id = expect_bytes(f[0], what + " pack id", min_len=32, max_len=32)
        length = expect_int(f[1], what + " pack length")
        kind = expect_int(f[2], what + " pack kind", hi=KIND_META)
        entries = []
        for e in expect_list(f[3], what + " entries", max_len=MAX_PACK_ENTRIES):
            loc = decode_pack_row(e, pack_id, what + " entry")
            if loc.end > length - TAIL_LEN:
                fail(what, f"entry at {loc.offset} lies past the body of pack {pack_id.hex()[:12]} ({length} bytes)")
            entries.append(loc)
        out.append(PackSummary(pack_id, length, kind, tuple(entries)))
    return out

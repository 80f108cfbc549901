"""SourceInfo: where the stored bytes of one object live.

Encoded as the msgpack array ``[id, pack, offset, stored_length, length, codec]``:

- ``id``: 32 bytes, BLAKE3-256 of the plain bytes (a chunk id or a node id);
- ``pack``: 32 bytes, the id of the pack holding the stored bytes;
- ``offset``, ``stored_length``: the byte range of the stored bytes inside the pack;
- ``length``: the plain length after decoding;
- ``codec``: 0 raw (``stored_length == length``), 1 zstd frame.

A file is an ordered list of these for its chunks (so a file may span packs); a
directory entry references its child directory's node with one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from cafs.errors import FormatError, IntegrityError
from cafs.format.strict import expect_bytes, expect_int, expect_list, fail
from cafs.ids import ChunkId, PackId, digest

CODEC_RAW = 0
CODEC_ZSTD = 1
CODECS = (CODEC_RAW, CODEC_ZSTD)

MAX_CHUNK = 64 << 20  # no chunker setting may exceed this; bounds decompression


class Location(NamedTuple):
    id: bytes
    pack: bytes
    offset: int
    stored_length: int
    length: int
    codec: int

    def encode(self) -> list[Any]:
        return [self.id, self.pack, self.offset, self.stored_length, self.length, self.codec]

    @property
    def end(self) -> int:
        return self.offset + self.stored_length

    def describe(self) -> str:
        return f"{self.id.hex()[:12]} in pack {self.pack.hex()[:12]}@{self.offset}"


MAX_STORED = MAX_CHUNK + (1 << 20)
MAX_OFFSET = 1 << 40


def decode_location(value: Any, what: str) -> Location:
    # The common, valid case in one expression: decoding directories of 100,000 entries
    # is dominated by this function. Anything else takes the slow path for its message.
    if type(value) is list and len(value) == 6:
        oid, pack, offset, stored, length, codec = value
        if type(pack) is bytes and len(pack) == 32 and _plain_fields(oid, offset, stored, length, codec):
            return Location(oid, pack, offset, stored, length, codec)
    return _decode_location_checked(value, what)


def decode_pack_row(value: Any, pack: bytes, what: str) -> Location:
    """The location a row ``[id, offset, stored_length, length, codec]`` of a pack's
    trailer or of an index object gives, in ``pack`` (already checked). An index of a
    large repository holds millions of rows: the valid case takes one expression."""
    if type(value) is list and len(value) == 5:
        oid, offset, stored, length, codec = value
        if _plain_fields(oid, offset, stored, length, codec):
            return Location(oid, pack, offset, stored, length, codec)
    f = expect_list(value, what, length=5)
    return _decode_location_checked([f[0], pack, f[1], f[2], f[3], f[4]], what)


def _plain_fields(oid: Any, offset: Any, stored: Any, length: Any, codec: Any) -> bool:
    """Whether these are a valid location's fields but for its pack (the slow path says
    what is wrong with them if not)."""
    return (type(oid) is bytes and len(oid) == 32
            and type(offset) is int and 0 <= offset <= MAX_OFFSET
            and type(stored) is int and 0 <= stored <= MAX_STORED
            and type(length) is int and 0 <= length <= MAX_CHUNK
            and (codec == CODEC_ZSTD or (codec == CODEC_RAW and stored == length)) and type(codec) is int)


def _decode_location_checked(value: Any, what: str) -> Location:
    fields = expect_list(value, what, length=6)
    oid = expect_bytes(fields[0], what + " id", min_len=32, max_len=32)
    pack = expect_bytes(fields[1], what + " pack", min_len=32, max_len=32)
    offset = expect_int(fields[2], what + " offset", hi=MAX_OFFSET)
    stored = expect_int(fields[3], what + " stored length", hi=MAX_STORED)
    length = expect_int(fields[4], what + " length", hi=MAX_CHUNK)
    codec = expect_int(fields[5], what + " codec", hi=CODEC_ZSTD)
    if codec == CODEC_RAW and stored != length:
        fail(what, f"raw codec with stored length {stored} != length {length}")
    return Location(oid, pack, offset, stored, length, codec)


def decode_stored(loc: Location, stored: bytes | bytearray | memoryview) -> bytes:
    """Plain bytes of ``loc`` from its stored bytes, verified against ``loc.id``.

    Raises IntegrityError if the bytes do not decode to exactly ``loc.length`` bytes
    whose BLAKE3 is ``loc.id``.
    """
    if len(stored) != loc.stored_length:
        raise IntegrityError(f"object {loc.describe()}: got {len(stored)} stored bytes, expected {loc.stored_length}")
    if loc.codec == CODEC_ZSTD:
        import zstandard  # on first use: listing a tree decodes no chunk

        try:
            # A frame that declares its size is decoded to that size whatever
            # max_output_size says, so the declaration is checked first.
            declared = zstandard.frame_content_size(stored)
            if declared not in (-1, loc.length):
                raise IntegrityError(f"object {loc.describe()}: zstd frame declares {declared} bytes, expected {loc.length}")
            plain = zstandard.ZstdDecompressor().decompress(stored, max_output_size=loc.length)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"object {loc.describe()}: zstd frame does not decode: {exc}") from None
    else:
        plain = bytes(stored)
    if len(plain) != loc.length or digest(plain) != loc.id:
        raise IntegrityError(f"object {loc.describe()}: content does not match its id")
    return plain


def plain_view(loc: Location, stored: memoryview) -> bytes | memoryview:
    """``decode_stored`` without the copy of a raw object: its plain bytes are ``stored``
    itself, hashed in place (a view keeps what it views alive: for the chunks of one
    buffer, read together)."""
    if loc.codec == CODEC_RAW:
        verify_stored(loc, stored)
        return stored
    return decode_stored(loc, stored)


def verify_stored(loc: Location, stored: bytes | memoryview) -> None:
    """Raise IntegrityError unless ``stored`` decodes to the object ``loc`` names; a raw
    object is hashed in place, without a copy."""
    if loc.codec == CODEC_RAW:
        if len(stored) != loc.length or digest(stored) != loc.id:
            raise IntegrityError(f"object {loc.describe()}: content does not match its id")
    else:
        decode_stored(loc, stored)


def chunk_id(loc: Location) -> ChunkId:
    return ChunkId(loc.id)


def pack_id(loc: Location) -> PackId:
    return PackId(loc.pack)


__all__ = ["Location", "decode_location", "decode_stored", "plain_view", "CODEC_RAW", "CODEC_ZSTD", "FormatError"]

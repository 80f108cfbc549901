"""Format objects: round trips of every object, and strict rejection of malformed bytes."""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from cafs.errors import FormatError, IntegrityError, RefError, RepositoryError
from cafs.format.config import ChunkerParams, RepoConfig, decode_config, encode_config
from cafs.format.index import PackSummary, decode_index, encode_index
from cafs.format.journal import Snapshot, check_ref_name, decode_snapshot, encode_snapshot
from cafs.format.location import CODEC_RAW, CODEC_ZSTD, Location, decode_location, decode_stored, plain_view
from cafs.format.nodes import (
    KIND_DIR, KIND_FILE, KIND_SYMLINK, PAGE_ENTRIES, DirIndexNode, Entry, FileNode, PageRef, TreeNode,
    decode_entry, decode_node, encode_node, encode_tree, entry_fields,
)
from cafs.format.pack import TAIL_LEN, decode_trailer, encode_trailer, trailer_length
from cafs.ids import digest

ids = st.binary(min_size=32, max_size=32)
names = st.binary(min_size=1, max_size=255).filter(lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
u32 = st.integers(0, (1 << 32) - 1)


@st.composite
def locations(draw: st.DrawFn) -> Location:
    codec = draw(st.sampled_from([CODEC_RAW, CODEC_ZSTD]))
    length = draw(st.integers(0, 1 << 22))
    stored = length if codec == CODEC_RAW else draw(st.integers(0, 1 << 22))
    return Location(draw(ids), draw(ids), draw(st.integers(0, 1 << 40)), stored, length, codec)


@st.composite
def entries(draw: st.DrawFn, name: bytes | None = None) -> Entry:
    kind = draw(st.sampled_from([KIND_DIR, KIND_FILE, KIND_SYMLINK]))
    common = dict(name=name if name is not None else draw(names), kind=kind, mode=draw(st.integers(0, 0o7777)),
                  uid=draw(u32), gid=draw(u32), mtime_ns=draw(st.integers(-(1 << 63), (1 << 63) - 1)),
                  nlink=draw(st.integers(1, 1 << 20)), ino=draw(st.integers(0, (1 << 64) - 1)),
                  blocks=draw(st.none() | st.integers(0, (1 << 63) - 1)))  # None: a format-2 entry
    if kind == KIND_DIR:
        return Entry(size=draw(st.integers(0, 1 << 20)), ref=draw(locations()), **common)
    if kind == KIND_SYMLINK:
        target = draw(st.binary(min_size=1, max_size=4096).filter(lambda t: b"\0" not in t))
        return Entry(size=len(target), target=target, **common)
    if draw(st.booleans()):
        spans = tuple(draw(st.lists(locations(), max_size=16)))
        return Entry(size=sum(s.length for s in spans), spans=spans, **common)
    return Entry(size=draw(st.integers(0, 1 << 50)), ref=draw(locations()), **common)


@given(locations())
def test_location_round_trip(loc: Location) -> None:
    assert decode_location(msgpack.unpackb(msgpack.packb(loc.encode())), "t") == loc


@given(entries())
def test_entry_round_trip(e: Entry) -> None:
    assert decode_entry(msgpack.unpackb(msgpack.packb(e.encode())), "t") == e


@settings(max_examples=50)
@given(st.lists(entries(), max_size=20))
def test_tree_node_round_trip(items: list[Entry]) -> None:
    unique = {e.name: e for e in items}
    node = TreeNode(tuple(unique[n] for n in sorted(unique)))
    assert decode_node(encode_node(node)) == node


@settings(max_examples=50)
@given(st.lists(entries(), max_size=20), st.data())
def test_a_tree_with_entries_as_read_encodes_as_the_decoded_tree(items: list[Entry], data: st.DataObject) -> None:
    unique = {e.name: e for e in items}
    node = TreeNode(tuple(unique[n] for n in sorted(unique)))
    raw = entry_fields(encode_node(node))
    assert raw is not None
    mixed = [r if data.draw(st.booleans()) else e for r, e in zip(raw, node.entries, strict=True)]
    assert encode_tree(mixed) == encode_node(node)


@given(st.lists(st.tuples(names, st.integers(1, PAGE_ENTRIES), locations()), min_size=1, max_size=20))
def test_dir_index_round_trip(pages: list[tuple[bytes, int, Location]]) -> None:
    unique = {p[0]: p for p in pages}
    node = DirIndexNode(tuple(PageRef(*unique[n]) for n in sorted(unique)))
    assert decode_node(encode_node(node)) == node


@given(st.lists(locations(), max_size=50))
def test_file_node_round_trip(spans: list[Location]) -> None:
    node = FileNode(tuple(spans))
    assert decode_node(encode_node(node)) == node


@given(st.binary(max_size=2000))
def test_garbage_never_decodes_to_anything_but_format_error(data: bytes) -> None:
    for decode in (lambda d: decode_node(d), lambda d: decode_index(d), lambda d: decode_snapshot(d, "r", 1)):
        try:
            decode(data)
        except (FormatError, RefError):
            pass


@given(st.data())
def test_mutated_node_is_rejected_or_decodes_cleanly(data: st.DataObject) -> None:
    node = TreeNode(tuple(sorted({e.name: e for e in data.draw(st.lists(entries(), min_size=1, max_size=5))}.values(),
                                 key=lambda e: e.name)))
    raw = bytearray(encode_node(node))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        decode_node(bytes(raw))
    except FormatError:
        pass


def _entry(**kw: object) -> list[object]:
    base = dict(name=b"f", kind=KIND_FILE, mode=0o644, uid=0, gid=0, mtime_ns=0, size=0, nlink=1, ino=1,
                spans=())
    base.update(kw)
    return Entry(**base).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize("bad_name", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_entry_names_are_checked(bad_name: bytes) -> None:
    with pytest.raises(FormatError):
        decode_entry(_entry(name=bad_name), "t")


def test_entry_rejects_spans_that_disagree_with_size() -> None:
    loc = Location(b"a" * 32, b"p" * 32, 0, 10, 10, CODEC_RAW)
    with pytest.raises(FormatError, match="add up"):
        decode_entry(_entry(size=11, spans=(loc,)), "t")


def test_entry_blocks_are_optional_and_checked() -> None:
    assert len(_entry()) == 10 and decode_entry(_entry(), "t").blocks is None  # format 1-2
    assert decode_entry(_entry(blocks=8), "t").blocks == 8
    for bad in (-1, 1 << 63, "8", None):
        with pytest.raises(FormatError, match="blocks"):
            decode_entry(_entry(blocks=0)[:10] + [bad], "t")
    with pytest.raises(FormatError, match="10 or 11 fields"):
        decode_entry(_entry(blocks=0) + [0], "t")


def test_entry_rejects_symlink_with_nul() -> None:
    with pytest.raises(FormatError):
        decode_entry(_entry(kind=KIND_SYMLINK, size=3, spans=None, target=b"a\0b"), "t")


def test_tree_rejects_unsorted_or_duplicate_names() -> None:
    a, b = _entry(name=b"a"), _entry(name=b"b")
    for items in ([b, a], [a, a]):
        with pytest.raises(FormatError, match="ascending"):
            decode_node(msgpack.packb([1, items]))


def test_raw_location_must_have_equal_lengths() -> None:
    with pytest.raises(FormatError):
        decode_location([b"a" * 32, b"p" * 32, 0, 10, 11, CODEC_RAW], "t")


def test_decode_stored_verifies_content() -> None:
    plain = b"hello world" * 100
    packed = zstandard.ZstdCompressor().compress(plain)
    good = Location(digest(plain), b"p" * 32, 0, len(packed), len(plain), CODEC_ZSTD)
    assert decode_stored(good, packed) == plain
    with pytest.raises(IntegrityError):
        decode_stored(good._replace(id=b"x" * 32), packed)
    raw = Location(digest(plain), b"p" * 32, 0, len(plain), len(plain), CODEC_RAW)
    flipped = bytearray(plain)
    flipped[5] ^= 1
    with pytest.raises(IntegrityError):
        decode_stored(raw, bytes(flipped))


def test_plain_view_verifies_and_does_not_copy_raw_objects() -> None:
    plain = b"hello world" * 100
    packed = zstandard.ZstdCompressor().compress(plain)
    buffer = memoryview(b"pad" + plain + packed)
    raw = Location(digest(plain), b"p" * 32, 3, len(plain), len(plain), CODEC_RAW)
    view = plain_view(raw, buffer[3:3 + len(plain)])
    assert isinstance(view, memoryview) and view.obj is buffer.obj and view == plain
    zstd = Location(digest(plain), b"p" * 32, 3 + len(plain), len(packed), len(plain), CODEC_ZSTD)
    assert plain_view(zstd, buffer[3 + len(plain):]) == plain
    for loc, stored in ((raw, buffer[2:2 + len(plain)]), (zstd, buffer[3 + len(plain):-1]),
                        (raw._replace(id=b"x" * 32), buffer[3:3 + len(plain)])):
        with pytest.raises(IntegrityError):
            plain_view(loc, stored)


def test_decompression_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    loc = Location(digest(b"\0" * 100), b"p" * 32, 0, len(bomb), 100, CODEC_ZSTD)
    with pytest.raises(IntegrityError, match="declares"):
        decode_stored(loc, bomb)


def _peak_memory_of(decode: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FormatError):
            decode()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("empty", [b"\x90", b"\x80"])  # an empty array, an empty map
@pytest.mark.parametrize("decode", ["node", "index", "trailer"])
def test_a_few_mib_of_empty_containers_do_not_take_a_hundred(empty: bytes, decode: str) -> None:
    # 2 MiB of one-byte empty arrays decoded to 2 million lists (130 MB) before any check
    # (a node of 64 MiB, a few KiB as a zstd frame, to 5 GB): the bytes are in a node's
    # entries, an index's packs or a trailer's entries, where arrays belong
    n = 2 << 20
    many = b"\xdd" + struct.pack(">I", n) + empty * n
    data = {"node": b"\x92\x01" + many, "index": b"\x92\x01" + many,
            "trailer": b"\x94\x01\x00\xc4\x20" + b"d" * 32 + many}[decode]
    run = {"node": lambda: decode_node(data), "index": lambda: decode_index(data),
           "trailer": lambda: decode_trailer(data, b"p" * 32, len(data) + TAIL_LEN, "t")}[decode]
    assert _peak_memory_of(run) < 8 * len(data)


def test_large_objects_of_many_small_arrays_still_decode() -> None:
    # what the limit on arrays per byte must let through: a file node, a directory index
    # and an index object of several MiB
    spans = tuple(Location(digest(b"%d" % i), b"p" * 32, i * 1000, 1000, 1000, CODEC_RAW) for i in range(20_000))
    node: DirIndexNode | FileNode = FileNode(spans)
    assert len(encode_node(node)) > 1 << 20 and decode_node(encode_node(node)) == node
    node = DirIndexNode(tuple(PageRef(b"%06d" % i, 1, loc) for i, loc in enumerate(spans)))
    assert len(encode_node(node)) > 1 << 20 and decode_node(encode_node(node)) == node
    packs = [PackSummary(digest(b"%d" % i), 1000, 0, ()) for i in range(40_000)]  # the fewest bytes per array
    packs[0] = PackSummary(b"p" * 32, 30_000_000, 0, spans)
    assert len(encode_index(packs)) > 1 << 20 and decode_index(encode_index(packs)) == packs


@given(st.lists(st.tuples(ids, st.binary(max_size=300)), max_size=20))
def test_pack_trailer_round_trip(objects: list[tuple[bytes, bytes]]) -> None:
    body = b"".join(o[1] for o in objects)
    locs, pos = [], 0
    pack_id = os.urandom(32)
    for oid, data in objects:
        locs.append(Location(oid, pack_id, pos, len(data), len(data), CODEC_RAW))
        pos += len(data)
    pack = body + encode_trailer(1, digest(body), locs)
    n = trailer_length(pack[-TAIL_LEN:], "t")
    trailer = decode_trailer(pack[-TAIL_LEN - n:-TAIL_LEN], pack_id, len(pack), "t")
    assert trailer.entries == tuple(locs) and trailer.body_digest == digest(body) and trailer.kind == 1


def test_truncated_pack_is_detected() -> None:
    pack = b"abc" + encode_trailer(0, digest(b"abc"), [Location(b"i" * 32, b"p" * 32, 0, 3, 3, 0)])
    with pytest.raises(FormatError, match="magic"):
        trailer_length(pack[:-1][-TAIL_LEN:], "t")


@settings(max_examples=30)
@given(st.lists(st.tuples(ids, st.integers(0, 1 << 30), st.sampled_from([0, 1]), st.lists(locations(), max_size=5)),
                max_size=5))
def test_index_round_trip(rows: list[tuple[bytes, int, int, list[Location]]]) -> None:
    packs = [PackSummary(pid, max((loc.end for loc in locs), default=0) + TAIL_LEN + extra, kind,
                         tuple(loc._replace(pack=pid) for loc in locs))
             for pid, extra, kind, locs in rows]
    assert decode_index(encode_index(packs)) == packs


def _index_with_entry(entry: object, pack_length: int = 1000) -> bytes:
    return msgpack.packb([1, [[b"p" * 32, pack_length, 0, [entry]]]])


@pytest.mark.parametrize("entry", [[], [b"i" * 32], [b"i" * 32, 0, 5, 5], [b"i" * 32, 0, 5, 5, 0, 0], None, 7,
                                   [b"i" * 32, b"p" * 32, 0, 5, 5, 0]])
def test_index_entry_of_another_shape_is_a_format_error(entry: object) -> None:
    # an index object is read by import, gc, copy and fsck: a malformed one is a finding
    # of fsck and is passed over by the others, never a traceback
    with pytest.raises(FormatError, match="entry"):
        decode_index(_index_with_entry(entry))


def test_index_entry_past_its_pack_is_refused() -> None:
    assert decode_index(_index_with_entry([b"i" * 32, 0, 5, 5, 0], 5 + TAIL_LEN))[0].entries[0].end == 5
    with pytest.raises(FormatError, match="past the body"):
        decode_index(_index_with_entry([b"i" * 32, 0, 5, 5, 0], 4 + TAIL_LEN))
    with pytest.raises(FormatError, match="past the body"):
        decode_index(_index_with_entry([b"i" * 32, 1 << 40, 5, 5, 0], 1 << 30))


@given(entries(name=b""), st.integers(1, 1 << 40), st.text(max_size=50), st.binary(max_size=100))
def test_snapshot_round_trip(root: Entry, jid: int, host: str, source: bytes) -> None:
    if not root.is_dir:
        return
    snap = Snapshot("ds", jid, 123, root, host, source, {"files": 3})
    assert decode_snapshot(encode_snapshot(snap), "ds", jid) == snap


def test_snapshot_jid_must_match_its_key() -> None:
    root = Entry(b"", KIND_DIR, 0o755, 0, 0, 0, 0, 2, 1, ref=Location(b"r" * 32, b"p" * 32, 0, 1, 1, 0))
    data = encode_snapshot(Snapshot("ds", 2, 0, root))
    with pytest.raises(RefError):
        decode_snapshot(data, "ds", 3)


def _root() -> Entry:
    return Entry(b"", KIND_DIR, 0o755, 0, 0, 7, 0, 2, 1, ref=Location(b"r" * 32, b"p" * 32, 0, 1, 1, 0))


@given(st.data())
def test_snapshot_with_any_byte_changed_is_refused(data: st.DataObject) -> None:
    encoded = bytearray(encode_snapshot(Snapshot("ds", 2, 5, _root(), "host", b"/src", {"files": 3})))
    i = data.draw(st.integers(0, len(encoded) - 1))
    encoded[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((RefError, FormatError)):
        decode_snapshot(bytes(encoded), "ds", 2)


def test_snapshot_of_version_1_without_checksum_still_reads() -> None:
    snap = Snapshot("ds", 2, 5, _root(), "host", b"/src", {"files": 3})
    body = encode_snapshot(snap)[:-32]
    assert decode_snapshot(body.replace(b"\xa1v\x02", b"\xa1v\x01", 1), "ds", 2) == snap
    with pytest.raises(RefError, match="checksum"):
        decode_snapshot(body, "ds", 2)  # a version-2 body that lost its checksum


@pytest.mark.parametrize("name", ["a/b", "", ".hidden", "-x", "a b", "x" * 101, "a#b", "a@b", "a:b"])
def test_bad_ref_names(name: str) -> None:
    with pytest.raises(RefError):
        check_ref_name(name)


def test_a_config_of_a_newer_format_says_to_upgrade() -> None:
    newer = encode_config(RepoConfig("ab" * 32)).replace(b'"version": 3', b'"version": 4')
    with pytest.raises(RepositoryError, match="repository format version 4; this cafs reads versions 1, 2, 3; "
                                              "a newer cafs made it: upgrade cafs"):
        decode_config(newer, "t")


def test_config_round_trip_and_rejects() -> None:
    c = RepoConfig("ab" * 32, ChunkerParams(1024, 4096, 16384), 1 << 20)
    assert decode_config(encode_config(c), "t") == c
    older = RepoConfig("ab" * 32, version=2)
    assert decode_config(encode_config(older), "t").version == 2  # what an import writes depends on it
    for bad in (b"", b"{}", b"not json", b'{"format": "cafs", "version": 99}',
                encode_config(c).replace(b'"version": 3', b'"version": true'),
                encode_config(c).replace(b'"pack_size": 1048576', b'"pack_size": 1')):
        with pytest.raises(RepositoryError):
            decode_config(bad, "t")


@pytest.mark.parametrize("field,value", [(b'"pack_size": 1048576', b'"pack_size": 1125899906842624'),
                                         (b'"max_size": 16384', b'"max_size": 1024'),
                                         (b'"repo_id": "' + b"ab" * 32, b'"repo_id": "' + b"zz" * 32)])
def test_a_config_out_of_range_is_named(field: bytes, value: bytes) -> None:
    # every command opens the config first: its one error line must say which object is bad
    data = encode_config(RepoConfig("ab" * 32, ChunkerParams(1024, 4096, 16384), 1 << 20))
    assert field in data
    with pytest.raises(RepositoryError, match=r"^file:///r/config: not a cafs repository config \("):
        decode_config(data.replace(field, value), "file:///r/config")

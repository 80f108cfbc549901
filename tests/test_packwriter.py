"""PackWriter: packs on disk hold exactly the objects added, at the locations returned,
whatever their sizes relative to the target and the segments, whether the store takes
a pack in pieces (a local disk) or whole; a failed write leaves nothing behind."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any

import pytest

from cafs.format.pack import KIND_DATA, pack_key, verify_pack
from cafs.ids import digest
from cafs.packwriter import SEGMENT, PackWriter, Uploader
from cafs.errors import NoSpaceError
from cafs.stores import LocalStore
from cafs.stores.local import TMP_PREFIX
from pagecache import needs_fincore, resident_bytes, skip_unless_observable
from storewrap import PassThroughStore


def test_objects_land_where_add_says(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    uploader = Uploader(store)
    writer = PackWriter(uploader, KIND_DATA, 1 << 20)
    sizes = [100, 700_000, 500_000, SEGMENT + (3 << 20), 10, 2 << 20, 1, 900_000] * 2
    added = []
    for n in sizes:
        data = os.urandom(n)
        added.append((writer.add(digest(data), data, n, 0), data))
    writer.seal()
    uploader.drain()
    uploader.close()
    assert len(uploader.written) >= 6
    for loc, data in added:
        assert store.get(pack_key(loc.pack), loc.offset, loc.stored_length) == data
    for summary in uploader.written:
        body = store.get(pack_key(summary.pack_id))
        assert len(body) == summary.length
        verify_pack(body, bytes(summary.pack_id), "pack")


@needs_fincore
def test_local_store_leaves_packs_out_of_the_page_cache(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    skip_unless_observable(tmp_path)
    store.put("packs/big", os.urandom(4 << 20))
    store.put("refs/small", b"x" * 4096)
    assert resident_bytes(tmp_path / "packs/big") == 0
    assert resident_bytes(tmp_path / "refs/small") > 0  # small objects are read back soon


@needs_fincore
def test_local_store_writes_page_aligned_buffers_around_the_page_cache(tmp_path: Path) -> None:
    # Pack buffers are anonymous maps: their aligned head goes out with O_DIRECT (even
    # without fsync), the unaligned tail the ordinary way; the bytes are the same.
    skip_unless_observable(tmp_path)
    body = os.urandom((3 << 20) + 123)
    buf = mmap.mmap(-1, len(body))
    buf[:] = body
    store = LocalStore(tmp_path, fsync=False)
    with memoryview(buf) as view:
        store.put("packs/direct", view)
    assert resident_bytes(tmp_path / "packs/direct") <= 4096
    assert (tmp_path / "packs/direct").read_bytes() == body


@needs_fincore
def test_local_store_ranged_reads_leave_the_page_cache(tmp_path: Path) -> None:
    # A mount reading a local repository in place hands the bytes to the kernel, whose
    # page cache for the mounted file keeps them: the pack's pages would be a second copy.
    skip_unless_observable(tmp_path)
    store = LocalStore(tmp_path)
    body = os.urandom(4 << 20)
    store.put("packs/p", body)
    assert store.get("packs/p", 1 << 20, 2 << 20) == body[1 << 20:3 << 20]
    assert resident_bytes(tmp_path / "packs/p") == 0


def test_a_store_that_takes_whole_objects_gets_the_same_packs(tmp_path: Path) -> None:
    # PassThroughStore has no open_writer: each pack is gathered and put whole.
    local = LocalStore(tmp_path, fsync=False)
    uploader = Uploader(PassThroughStore(local))
    writer = PackWriter(uploader, KIND_DATA, 3 << 20)
    added = []
    for n in [SEGMENT + 5, 100, 2 << 20, SEGMENT * 2 + 7, 0, 3]:
        data = os.urandom(n)
        added.append((writer.add(digest(data), data, n, 0), data))
    writer.seal()
    uploader.drain()
    uploader.close()
    for loc, data in added:
        assert local.get(pack_key(loc.pack), loc.offset, loc.stored_length) == data
    for summary in uploader.written:
        verify_pack(local.get(pack_key(summary.pack_id)), bytes(summary.pack_id), "pack")


def _temporary_files(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TMP_PREFIX}*")]


def test_a_pack_streams_to_a_local_store_while_it_fills(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    uploader = Uploader(store)
    writer = PackWriter(uploader, KIND_DATA, 64 << 20)
    data = os.urandom(2 * SEGMENT + 1)
    loc = writer.add(digest(data), data, len(data), 0)
    deadline = time.monotonic() + 10
    while sum(p.stat().st_size for p in _temporary_files(tmp_path)) < 2 * SEGMENT:
        assert time.monotonic() < deadline, "the full segments were not written before the seal"
        time.sleep(0.01)
    assert uploader.written == []  # not committed: a reader sees no pack yet
    writer.seal()
    uploader.drain()
    uploader.close()
    assert store.get(pack_key(loc.pack), loc.offset, loc.stored_length) == data
    assert _temporary_files(tmp_path) == []


class _DiskFillsUp(LocalStore):
    """A local store whose objects fail with a full disk after ``room`` bytes."""

    def __init__(self, root: Path, room: int) -> None:
        super().__init__(root, fsync=False)
        self.room = room

    def open_writer(self, key: str) -> Any:
        writer = super().open_writer(key)
        store = self

        class Filling:
            def write(self, data: bytes | bytearray | memoryview) -> None:
                if len(data) > store.room:
                    raise NoSpaceError(f"{store.url}: no space left on device writing {key}")
                store.room -= len(data)
                writer.write(data)

            def commit(self) -> None:
                writer.commit()

            def abort(self) -> None:
                writer.abort()

        return Filling()


def test_a_full_disk_while_a_pack_streams_raises_and_leaves_nothing_behind(tmp_path: Path) -> None:
    store = _DiskFillsUp(tmp_path, room=SEGMENT + SEGMENT // 2)
    uploader = Uploader(store)
    writer = PackWriter(uploader, KIND_DATA, 64 << 20)
    with pytest.raises(NoSpaceError):
        for _ in range(8):
            data = os.urandom(SEGMENT // 2)
            writer.add(digest(data), data, len(data), 0)
        writer.seal()
        uploader.drain()
    uploader.close()
    assert uploader.written == []
    assert _temporary_files(tmp_path) == []
    assert list(store.list("packs/")) == []


def test_closing_before_the_seal_gives_up_the_open_pack(tmp_path: Path) -> None:
    # An import that stops (an error elsewhere, Ctrl-C) leaves no half-written pack.
    store = LocalStore(tmp_path, fsync=False)
    uploader = Uploader(store)
    writer = PackWriter(uploader, KIND_DATA, 64 << 20)
    data = os.urandom(SEGMENT + 10)
    writer.add(digest(data), data, len(data), 0)
    uploader.close()
    assert _temporary_files(tmp_path) == []
    assert list(store.list("packs/")) == []

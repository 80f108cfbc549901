"""PackWriter: packs on disk hold exactly the objects added, at the locations returned,
whatever their sizes relative to the target (recycled buffers, objects past the slack)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from cafs.format.pack import KIND_DATA, pack_key, verify_pack
from cafs.ids import digest
from cafs.packwriter import SLACK, PackWriter, Uploader
from cafs.stores import LocalStore
from pagecache import needs_fincore, resident_bytes, skip_unless_observable


def test_objects_land_where_add_says(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    uploader = Uploader(store)
    writer = PackWriter(uploader, KIND_DATA, 1 << 20)
    sizes = [100, 700_000, 500_000, SLACK + (3 << 20), 10, 2 << 20, 1, 900_000] * 2
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

"""PackWriter: packs on disk hold exactly the objects added, at the locations returned,
whatever their sizes relative to the target (recycled buffers, objects past the slack)."""

from __future__ import annotations

import os
from pathlib import Path

from cafs.format.pack import KIND_DATA, pack_key, verify_pack
from cafs.ids import digest
from cafs.packwriter import SLACK, PackWriter, Uploader
from cafs.stores import LocalStore


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

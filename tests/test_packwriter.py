"""PackWriter: packs on disk hold exactly the objects added, at the locations returned,
whatever their sizes relative to the target (recycled buffers, objects past the slack)."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

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


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_local_store_leaves_packs_out_of_the_page_cache(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    control = tmp_path / "control"
    control.write_bytes(os.urandom(4 << 20))
    if _resident_bytes(control) == 0:
        pytest.skip("page cache residency is not observable on this filesystem")
    store.put("packs/big", os.urandom(4 << 20))
    store.put("refs/small", b"x" * 4096)
    assert _resident_bytes(tmp_path / "packs/big") == 0
    assert _resident_bytes(tmp_path / "refs/small") > 0  # small objects are read back soon


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs fincore (util-linux)")
def test_local_store_writes_page_aligned_buffers_around_the_page_cache(tmp_path: Path) -> None:
    # Pack buffers are anonymous maps: their aligned head goes out with O_DIRECT (even
    # without fsync), the unaligned tail the ordinary way; the bytes are the same.
    control = tmp_path / "control"
    control.write_bytes(os.urandom(4 << 20))
    if _resident_bytes(control) == 0:
        pytest.skip("page cache residency is not observable on this filesystem")
    body = os.urandom((3 << 20) + 123)
    buf = mmap.mmap(-1, len(body))
    buf[:] = body
    store = LocalStore(tmp_path, fsync=False)
    with memoryview(buf) as view:
        store.put("packs/direct", view)
    assert _resident_bytes(tmp_path / "packs/direct") <= 4096
    assert (tmp_path / "packs/direct").read_bytes() == body

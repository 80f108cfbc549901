"""The local store's reads for a mount on its event loop: ``advise`` and ``get_resident``
keep a bounded set of objects open, serve the right bytes, and let go of them."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from cafs.stores.local import OPEN_PACKS, LocalStore
from fdcount import open_below


def test_resident_reads_keep_at_most_open_packs_objects_open(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)  # small objects stay in the page cache
    bodies = {f"packs/{i:03}": os.urandom(5000 + i) for i in range(OPEN_PACKS + 20)}
    for key, body in bodies.items():
        store.put(key, body)
    assert open_below(tmp_path) == 0
    for _ in range(2):
        for key, body in bodies.items():
            store.advise(key, 100, 1000)
            got = store.get_resident(key, 100, 1000)
            assert got is not None and bytes(got) == body[100:1100], key
            assert open_below(tmp_path) <= OPEN_PACKS
    assert open_below(tmp_path) == OPEN_PACKS
    del store
    gc.collect()
    assert open_below(tmp_path) == 0


def test_an_open_object_still_reads_after_delete_and_a_missing_one_is_none(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fsync=False)
    store.put("packs/a", b"x" * 9000)
    assert store.get_resident("packs/a", 0, 10) == bytearray(b"x" * 10)
    store.delete("packs/a")
    assert store.get_resident("packs/a", 10, 10) == bytearray(b"x" * 10)  # immutable: still right
    assert store.get_resident("packs/missing", 0, 10) is None
    store.advise("packs/missing", 0, 10)  # a hint: no error
    assert store.get_resident("packs/a", 8990, 20) is None  # past the end: short

"""ChunkCache: under concurrency, with more packs in use than it keeps open, a descriptor
one thread is reading or writing through is never closed (and its number reused for
another pack's file) under it; what it writes and reads stays out of the page cache,
byte-exact at any offset, and without O_DIRECT too."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cafs import chunkcache
from cafs.chunkcache import ChunkCache
from cafs.metacache import MetaCache
from pagecache import evict, needs_fincore, resident_bytes, skip_unless_nowait_reads, skip_unless_observable

PACKS = 24
EXTENTS = 40
SIZE = 4096


def content(pack: int, i: int) -> bytes:
    return hashlib.sha256(b"%d:%d" % (pack, i)).digest() * (SIZE // 32)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[ChunkCache]:
    meta = MetaCache(tmp_path / "cache")
    cache = ChunkCache(tmp_path / "cache", meta.env, 1 << 40)
    try:
        yield cache
    finally:
        cache.close()
        meta.close()


def test_threads_over_more_packs_than_open_files(cache: ChunkCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkcache, "MAX_OPEN_PACKS", 2)
    packs = [bytes([p]) * 32 for p in range(PACKS)]
    errors: list[str] = []

    def work(seed: int) -> None:
        try:
            for round_ in range(EXTENTS):
                for k in range(PACKS):
                    p = (k * 7 + seed) % PACKS
                    i = (round_ + seed) % EXTENTS
                    cache.insert(packs[p], [(i * SIZE, content(p, i))])
                    got = cache.read(packs[p], i * SIZE, SIZE)
                    if got != content(p, i):
                        errors.append(f"pack {p} extent {i}: wrong bytes")
                        return
        except OSError as exc:
            errors.append(f"{exc}")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for p in range(PACKS):  # and every file holds what was written to it
        for i in range(EXTENTS):
            assert cache.read(packs[p], i * SIZE, SIZE) in (None, content(p, i))


def test_concurrent_inserts_never_record_more_than_the_limit(tmp_path: Path) -> None:
    # A mount writes through with several threads; each insert that passes the limit
    # evicts in its own transaction, so no moment sees the recorded total above it.
    limit = 64 * SIZE
    meta = MetaCache(tmp_path / "cache")
    limited = ChunkCache(tmp_path / "cache", meta.env, limit)
    seen: list[int] = []

    def work(seed: int) -> None:
        pack = bytes([seed]) * 32
        for i in range(200):
            limited.insert(pack, [(i * SIZE * 2, content(seed, i)), (i * SIZE * 2 + SIZE, content(seed, -i))])
            seen.append(limited.size())

    try:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(seen) <= limit
        assert limited.counters.evictions > 0
        with limited.env.begin(db=limited.extents) as txn:  # the total is the extents' sum
            assert limited.size() == sum(chunkcache._EXTENT.unpack(v)[0] for _k, v in txn.cursor())
    finally:
        limited.close()
        meta.close()


def test_eviction_frees_the_blocks_of_small_extents(tmp_path: Path) -> None:
    # Extents smaller than a block share blocks with their neighbours. Punching exactly
    # an evicted extent's bytes frees none of them; the blocks whose every extent is
    # gone must be freed, and no byte of an extent still recorded may be touched.
    limit = 256 * 1024
    meta = MetaCache(tmp_path / "cache")
    small = ChunkCache(tmp_path / "cache", meta.env, limit)
    packs = [bytes([p]) * 32 for p in range(4)]
    sizes = [3000 + 37 * i for i in range(300)]  # about 1.3 MB per pack
    try:
        for pack_no, pack in enumerate(packs):
            offset = 0
            for i, size in enumerate(sizes):
                small.insert(pack, [(offset, (content(pack_no, i) * 4)[:size])])
                offset += size
        allocated = sum(f.stat().st_blocks * 512 for f in (tmp_path / "cache").glob("data/*/*"))
        assert small.counters.evictions > 0
        assert allocated <= limit + 4 * 2 * 4096  # a shared block at each end of a pack's run
        for pack_no, pack in enumerate(packs):
            offset = 0
            for i, size in enumerate(sizes):
                if small.contains(pack, offset):
                    assert small.read(pack, offset, size) == (content(pack_no, i) * 4)[:size]
                offset += size
    finally:
        small.close()
        meta.close()


@needs_fincore
def test_reads_leave_the_cache_file_out_of_the_page_cache(cache: ChunkCache, tmp_path: Path) -> None:
    # The mount hands what it reads to the kernel, which keeps it in the page cache of
    # the mounted file; the cache file's pages would hold the same bytes twice.
    skip_unless_observable(tmp_path)
    pack, body = b"\x07" * 32, os.urandom(1 << 20)
    cache.insert(pack, [(0, body)])
    path = next((tmp_path / "cache").rglob(pack.hex()))
    with open(path, "rb") as f:  # another reader brings the pages in
        assert f.read() == body
    assert resident_bytes(path) > 0
    assert cache.read(pack, 0, len(body)) == body
    assert resident_bytes(path) == 0


@needs_fincore
def test_inserts_write_whole_blocks_past_the_page_cache(cache: ChunkCache, tmp_path: Path) -> None:
    # spans at odd offsets, two of them touching (one span), one short (buffered)
    skip_unless_observable(tmp_path)
    pack = b"\x09" * 32
    half = chunkcache.DIRECT_MIN // 2 + 10_000
    extents = [(1000, os.urandom(half)), (1000 + half, os.urandom(half + 1)), (3 * half, os.urandom(5000))]
    cache.insert(pack, extents)
    path = cache._path(pack)
    # only the partial blocks at the ends of the spans went through the page cache
    assert resident_bytes(path) <= 5 * chunkcache.DIRECT_ALIGN
    for offset, data in extents:
        assert cache.read(pack, offset, len(data)) == data
    with open(path, "rb") as f:
        whole = f.read()
    for offset, data in extents:
        assert whole[offset:offset + len(data)] == data
    assert cache.size() == sum(len(d) for _, d in extents)


def test_inserts_without_direct_io(cache: ChunkCache, monkeypatch: pytest.MonkeyPatch) -> None:
    # a filesystem that refuses O_DIRECT (EINVAL) gets everything through the page cache
    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    pack, body = b"\x0a" * 32, os.urandom(3 << 20)
    cache.insert(pack, [(12345, body)])
    assert not cache._direct
    assert cache.read(pack, 12345, len(body)) == body
    cache.insert(pack, [(12345 + len(body), body)])
    assert cache.read(pack, 12345 + len(body), len(body)) == body


@needs_fincore
def test_resident_reads_never_wait_for_the_disk(cache: ChunkCache, tmp_path: Path) -> None:
    skip_unless_nowait_reads(tmp_path)
    pack, size = b"\x07" * 32, 64 << 10
    data = os.urandom(size)
    cache.insert(pack, [(size, data)])
    path = cache._path(pack)
    evict(path)
    assert cache.read(pack, size, size, resident=True) is None  # on the disk only
    assert cache.read(pack, 0, size, resident=True) is None  # not cached at all
    cache.advise(pack, size, size)
    deadline = time.monotonic() + 10
    while resident_bytes(path) < size:
        assert time.monotonic() < deadline, "advise did not bring the extent into the page cache"
        time.sleep(0.01)
    assert cache.read(pack, size, size, resident=True) == data
    assert resident_bytes(path) == 0  # and what it read left the page cache


def _cache_files(root: Path) -> dict[str, int]:
    return {f.name: f.stat().st_blocks * 512 for f in root.glob("data/*/*")}


def test_a_pack_whose_every_extent_is_evicted_loses_its_file(tmp_path: Path) -> None:
    # Nothing of the pack is cached any more: an empty sparse file of its size is clutter,
    # and on a filesystem that cannot punch holes the only way to free its blocks.
    meta = MetaCache(tmp_path / "cache")
    small = ChunkCache(tmp_path / "cache", meta.env, 300 * 1024)
    old, new = b"\1" * 32, b"\2" * 32
    try:
        small.insert(old, [(i * 65536, content(1, i) * 16) for i in range(3)])
        small.insert(new, [(i * 65536, content(2, i) * 16) for i in range(4)])
        assert small.counters.evictions >= 3
        assert not any(small.contains(old, i * 65536) for i in range(3))
        assert list(_cache_files(tmp_path / "cache")) == [new.hex()]
        assert small.read(new, 3 * 65536, 65536) == content(2, 3) * 16
        small.insert(old, [(0, content(1, 0) * 16)])  # cached again: the file comes back
        assert small.read(old, 0, 65536) == content(1, 0) * 16
    finally:
        small.close()
        meta.close()


def test_a_cache_on_exfat_stays_near_its_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # exFAT punches no holes: evicting extents freed nothing, and the cache grew past
    # cache_size without a word until the disk was full.
    from fatfs import fat_mount

    limit = 4 << 20
    meta = MetaCache(tmp_path / "meta")
    with fat_mount("exfat", tmp_path) as mnt:
        small = ChunkCache(mnt / "cache", meta.env, limit)
        try:
            for p in range(8):
                small.insert(bytes([p]) * 32, [(i * 65536, content(p, i) * 16) for i in range(24)])  # 1.5 MiB
                small.insert(bytes([p]) * 32, [(0, content(p, 0) * 16)])
            on_disk = sum(_cache_files(mnt / "cache").values())
            assert on_disk <= limit + (3 << 20), f"{on_disk} bytes on disk for a limit of {limit}"
            assert small.read(bytes([7]) * 32, 23 * 65536, 65536) == content(7, 23) * 16
        finally:
            small.close()
            meta.close()
    assert "cannot punch holes" in caplog.text

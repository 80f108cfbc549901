"""The fetcher against a store that stalls or fails: one deadline per load, a short
memory of failed packs (so the kernel's retries do not each wait out a deadline),
forgotten when the store answers again, and ``close()`` ending every wait at once.

A ``LocalStore`` repository behind a wrapper that stalls (blocks until released) or
fails (``StoreUnavailable``) reads of chosen packs; the wrapper counts the reads that
reach it, so "at once" is asserted as "without asking the store", not as a time.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from mountfix import import_tree, make_repo
from storewrap import PassThroughStore

from cafs.errors import FetcherClosed, StoreUnavailable
from cafs.fetch import Fetcher
from cafs.format.location import Location
from cafs.metacache import NodeReader
from cafs.naming import find_snapshot
from cafs.repository import Repository
from cafs.stores import Store, open_store
from cafs.tree import file_spans, resolve

DEADLINE = 0.5


class FaultyStore(PassThroughStore):
    """Reads of packs named in ``stalled`` block until ``release`` is set; of packs in
    ``failing``, raise ``StoreUnavailable``. ``pack_reads`` counts every pack read."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.stalled: set[str] = set()
        self.failing: set[str] = set()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.pack_reads = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("packs/"):
            self.pack_reads += 1
            if key in self.stalled:
                self.entered.set()
                self.release.wait(60)
                raise StoreUnavailable(f"{key}: stalled")
            if key in self.failing:
                raise StoreUnavailable(f"{key}: failing")
        return self.inner.get(key, offset, length)


CONTENT = {name: random.Random(name).randbytes(600 << 10) for name in ("a", "b")}  # packs of their own


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fetch")
    src = base / "src"
    src.mkdir()
    for name, data in CONTENT.items():
        (src / name).write_bytes(data)
    repo = make_repo(base / "repo", base / "import-cache")
    import_tree(src, repo, "snap", base / "import-cache")
    return repo


@pytest.fixture
def store(repo_dir: Path) -> Iterator[FaultyStore]:
    store = FaultyStore(open_store(str(repo_dir)))
    try:
        yield store
    finally:
        store.release.set()  # abandoned threads end


def _first_chunks(store: FaultyStore, deadline: float) -> tuple[Fetcher, Location, Location]:
    """A fetcher with ``deadline`` and no cache, and the first chunk of files a and b."""
    repo = Repository.open(store, deadline=deadline)
    snapshot = find_snapshot(repo, "snap")
    reader = NodeReader(repo, None)
    a, b = (file_spans(reader, resolve(reader, snapshot.root, name))[0] for name in (b"a", b"b"))
    assert a.pack != b.pack
    return Fetcher(repo, None), a, b


def _key(loc: Location) -> str:
    return f"packs/{loc.pack.hex()[:2]}/{loc.pack.hex()}"


async def test_a_stalled_load_fails_at_its_deadline_and_its_pack_then_fails_at_once(
        store: FaultyStore) -> None:
    fetcher, a, _b = _first_chunks(store, DEADLINE)
    store.stalled.add(_key(a))
    with trio.fail_after(DEADLINE + 5):  # not after the stalled read, which lasts 60 s
        with pytest.raises(StoreUnavailable, match="not read from the store within 0.5 s"):
            await fetcher.chunk(a)
    reads = store.pack_reads
    with pytest.raises(StoreUnavailable, match="failed moments ago"):
        await fetcher.chunk(a)  # what the kernel asks again, page by page
    assert store.pack_reads == reads


async def test_a_load_that_succeeds_forgets_the_failures(store: FaultyStore) -> None:
    fetcher, a, b = _first_chunks(store, DEADLINE)
    store.failing.add(_key(a))
    with pytest.raises(StoreUnavailable):
        await fetcher.chunk(a)
    store.failing.clear()  # the store is back
    assert bytes(await fetcher.chunk(b)) == CONTENT["b"][:b.length]
    assert bytes(await fetcher.chunk(a)) == CONTENT["a"][:a.length]


async def test_close_ends_a_stalled_load_and_refuses_new_ones(store: FaultyStore) -> None:
    fetcher, a, b = _first_chunks(store, 60.0)
    assert bytes(await fetcher.chunk(b)) == CONTENT["b"][:b.length]
    store.stalled.add(_key(a))
    failed: list[BaseException] = []

    async def read() -> None:
        try:
            await fetcher.chunk(a)
        except FetcherClosed as exc:
            failed.append(exc)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.to_thread.run_sync(store.entered.wait, 10)
            fetcher.close()
    assert failed
    reads = store.pack_reads
    store.stalled.clear()
    with pytest.raises(FetcherClosed):
        await fetcher.chunk(a)
    assert store.pack_reads == reads
    assert bytes(await fetcher.chunk(b)) == CONTENT["b"][:b.length]  # what it holds is still served


def _held_by_lru(fetcher: Fetcher) -> int:
    """Bytes of the distinct buffers the fetcher's in-memory LRU keeps alive."""
    bases = {}
    for data in fetcher._memory.values():
        base = data.obj if isinstance(data, memoryview) else data
        bases[id(base)] = len(base)
    return sum(bases.values())


def test_the_memory_lru_counts_the_reads_its_chunks_keep_alive(repo_dir: Path) -> None:
    """A chunk cut from a run's read is a view into the whole read: an LRU that kept one
    chunk of each of many runs, counting the chunks alone, held many times its limit."""
    limit = 4 << 20
    fetcher = Fetcher(Repository.open(open_store(str(repo_dir))), None, memory_bytes=limit)
    reads = [bytearray(1 << 20) for _ in range(16)]  # runs of 1 MiB
    for i, read in enumerate(reads):
        fetcher._remember((b"p", i), memoryview(read)[:4096])  # one small chunk of each
    assert _held_by_lru(fetcher) <= limit
    assert len(fetcher._memory) == 4  # four reads fit, whole
    for i, read in enumerate(reads[-2:]):  # chunks of one read share its charge
        for j in range(1, 8):
            fetcher._remember((b"q", i * 8 + j), memoryview(read)[j * 4096:(j + 1) * 4096])
    assert len(fetcher._memory) == 4 + 14  # reads 12-15 still, whole
    fetcher._remember((b"r", 0), b"x" * 1000)  # a chunk of its own (decompressed) counts itself
    assert _held_by_lru(fetcher) <= limit
    assert fetcher.memory_held == _held_by_lru(fetcher)


def test_the_memory_lru_holds_a_bounded_number_of_tiny_chunks(repo_dir: Path) -> None:
    """Chunks of a few bytes (a dataset of tiny files) are thousands to a run's read,
    which counts once: the LRU, bounded by bytes alone, kept every chunk ever read (a
    mount that read 320,000 files of 5 bytes held 330 MB more, some 1 KB a file)."""
    fetcher = Fetcher(Repository.open(open_store(str(repo_dir))), None)
    read = memoryview(bytearray(1 << 20))  # one run's read
    for i in range(200_000):
        fetcher._remember((b"p", i), read[i * 5:i * 5 + 5])
    assert len(fetcher._memory) <= 1 << 16
    assert (b"p", 199_999) in fetcher._memory  # the newest are kept
    assert fetcher.memory_held == _held_by_lru(fetcher) == 1 << 20

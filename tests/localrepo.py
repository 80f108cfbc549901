"""A local repository opened in the test's own process, with its metadata cache, for
tests that call the importer and read back what it wrote.

``local_repo(tmp_path, chunker)`` is a context manager yielding a ``LocalRepo`` in
``tmp_path/repo`` (metadata cache in ``tmp_path/meta``); it closes the cache on the way
out, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cafs.format.config import ChunkerParams
from cafs.format.journal import Snapshot
from cafs.format.nodes import Entry
from cafs.importer import ImportResult, run_import
from cafs.metacache import MetaCache, NodeReader
from cafs.repository import Repository
from cafs.stores.local import LocalStore
from cafs.tree import resolve


class LocalRepo:
    def __init__(self, path: Path, cache: Path, chunker: ChunkerParams = ChunkerParams()) -> None:
        self.repo = Repository.init(LocalStore(path), chunker)
        self.meta = MetaCache(cache)
        self.reader = NodeReader(self.repo, self.meta)

    def import_(self, src: Path) -> ImportResult:
        """Import ``src`` as ref ``ds``, which must skip nothing."""
        result = run_import(self.repo, self.meta, src, "ds")
        assert not result.skipped
        return result

    def entry(self, snap: Snapshot | None, path: str) -> Entry:
        assert snap is not None
        return resolve(self.reader, snap.root, path.encode())


@contextmanager
def local_repo(tmp_path: Path, chunker: ChunkerParams = ChunkerParams()) -> Iterator[LocalRepo]:
    repo = LocalRepo(tmp_path / "repo", tmp_path / "meta", chunker)
    try:
        yield repo
    finally:
        repo.meta.close()

"""Forged snapshots: objects cafs would never write, written with its own writers.

A hostile or buggy writer can put anything in a repository under correct ids. ``Forger``
writes chunks and nodes (any bytes, any ``Node``) into real packs with ``PackWriter``,
an index object covering them, and commits a snapshot of any root, so tests can check
what every reader makes of it. The helpers build entries with the fields that matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cafs.format.journal import Snapshot
from cafs.format.location import CODEC_RAW, Location
from cafs.format.nodes import KIND_DIR, KIND_FILE, KIND_SYMLINK, Entry, Node, encode_node
from cafs.format.pack import KIND_DATA, KIND_META
from cafs.ids import digest
from cafs.packwriter import PackWriter, Uploader
from cafs.repository import Repository
from cafs.stores import open_store

MTIME = 10**18


class Forger:
    def __init__(self, repo: Path) -> None:
        self.repo = Repository.open(open_store(str(repo)))
        self._uploader = Uploader(self.repo.store)
        self._data = PackWriter(self._uploader, KIND_DATA, 1 << 30)
        self._meta = PackWriter(self._uploader, KIND_META, 1 << 30)

    def chunk(self, plain: bytes) -> Location:
        return self._data.add(digest(plain), plain, len(plain), CODEC_RAW)

    def node(self, node: Node) -> Location:
        raw = encode_node(node)
        return self._meta.add(digest(raw), raw, len(raw), CODEC_RAW)

    def commit(self, name: str, root: Location, size: int) -> Snapshot:
        """Seal the packs, index them and commit a snapshot of the directory node ``root``
        holding ``size`` entries."""
        self._data.seal()
        self._meta.seal()
        self._uploader.drain()
        self._uploader.close()
        self.repo.write_index(list(self._uploader.written))
        entry = Entry(b"", KIND_DIR, 0o755, 0, 0, MTIME, size, 2, 1, ref=root)
        return self.repo.commit(name, entry, source=b"/forged", stats={})


def file(name: bytes, spans: Sequence[Location]) -> Entry:
    return Entry(name, KIND_FILE, 0o644, 0, 0, MTIME, sum(s.length for s in spans), 1, 2, spans=tuple(spans))


def large_file(name: bytes, ref: Location, size: int) -> Entry:
    """A file whose spans are in the file node at ``ref``."""
    return Entry(name, KIND_FILE, 0o644, 0, 0, MTIME, size, 1, 3, ref=ref)


def directory(name: bytes, ref: Location, size: int) -> Entry:
    return Entry(name, KIND_DIR, 0o755, 0, 0, MTIME, size, 2, 4, ref=ref)


def symlink(name: bytes, target: bytes) -> Entry:
    return Entry(name, KIND_SYMLINK, 0o777, 0, 0, MTIME, len(target), 1, 5, target=target)

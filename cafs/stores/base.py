"""The store contract: where repository objects live.

A store moves opaque bytes by key; it never interprets them. Keys are relative,
``/``-separated, made of ``[A-Za-z0-9._-]`` components (no ``.`` or ``..``); the
repository layer chooses them. Behaviour such as retrying, rate limiting or counting is
added by wrapping a store, not by flags.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from collections.abc import Iterator

from cafs.errors import StoreError

if TYPE_CHECKING:
    from cafs.stores.trio_gets import TrioGets

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")


class ObjectExists(StoreError):
    """An exclusive put found the key already present."""


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or len(key) > 1024:
        raise StoreError(f"invalid object key {key[:200]!r}")
    return key


class Store(Protocol):
    url: str

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes ``[offset, offset+length)`` (to the end if ``length``
        is None). MUST return exactly that many bytes or raise: ``ObjectNotFound`` if the
        key does not exist, ``StoreError`` if the range lies past the end or the store fails."""
        ...

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        """Store ``data`` under ``key`` atomically: readers see all of it or nothing.
        With ``exclusive``, MUST raise ``ObjectExists`` instead of replacing an existing
        object. MUST raise ``NoSpaceError`` when the storage is full."""
        ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield ``(key, size)`` of every object whose key starts with ``prefix`` (a
        directory-like prefix ending in ``/``, or ``""`` for all), in no particular order."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...


@runtime_checkable
class ResidentReads(Protocol):
    """What a store on a local disk adds, so that a small read can be had without a
    worker thread: a hint that starts the disk early, and a read that never waits for it."""

    def advise(self, key: str, offset: int, length: int) -> None:
        """Start reading ``[offset, offset+length)`` into the page cache, without waiting.
        A hint: failures are ignored."""
        ...

    def get_resident(self, key: str, offset: int, length: int) -> bytearray | None:
        """The range (a fresh buffer, the caller's) if the page cache holds all of it,
        read without waiting for a disk; None otherwise, or on any failure (the ordinary
        ``get`` meets and reports it)."""
        ...


class ObjectWriter(Protocol):
    """One object written in pieces, in order; nobody sees it before ``commit``."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``. MUST raise ``NoSpaceError`` when the storage is full."""
        ...

    def commit(self) -> None:
        """Make the object visible under its key, atomically, as ``put`` would."""
        ...

    def abort(self) -> None:
        """Give the object up: nothing of it stays behind. Never raises."""
        ...


@runtime_checkable
class StreamingWrites(Protocol):
    """What a store adds when it can take an object in pieces as they are made (a pack
    on a local disk goes out segment by segment while it fills), instead of whole."""

    def open_writer(self, key: str) -> ObjectWriter:
        """A writer of a new object ``key`` (replacing any at commit)."""
        ...


@runtime_checkable
class Temporaries(Protocol):
    """What a store adds when a writer killed mid-object leaves its temporary file behind
    (a local disk: ``.tmp-*`` beside the final names; S3: an unfinished multipart
    upload), for gc to remove."""

    def remove_temporaries(self, prefix: str, older_than: float) -> tuple[int, int]:
        """Remove temporary files under ``prefix`` not written to for ``older_than``
        seconds (a live writer keeps its file's mtime fresh); returns (files, bytes)."""
        ...


@runtime_checkable
class TrioReads(Protocol):
    """What a store adds when it can answer small ranged reads on the trio loop itself
    (plain HTTP): a mount's cold small reads then need no worker thread."""

    def trio_gets(self, timeout: float) -> TrioGets | None:
        """A reader of ranges on the loop (``cafs.stores.trio_gets``), each attempt
        bounded by ``timeout`` seconds; None if this store cannot have one."""
        ...

"""A store that passes every call to another one: the base of the fault-injecting
stores tests wrap around a real ``LocalStore`` (a subclass overrides what it breaks)."""

from __future__ import annotations

from collections.abc import Iterator

from cafs.stores import Store


class PassThroughStore:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        self.inner.put(key, data, exclusive=exclusive)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

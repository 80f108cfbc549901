"""Bounded, strict msgpack decoding of untrusted bytes.

``unpack`` refuses oversized input, ext types, more arrays and maps than objects of that
size hold, and turns every decoder failure into ``FormatError`` naming ``what``. The
small ``expect_*`` helpers check one field each so decoders read as a list of checks.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgpack

from cafs.errors import FormatError

MAX_OBJECT_BYTES = 64 << 20
# An array or map costs far more decoded than encoded: an empty one is one byte, and a
# Python list of some 70 (16 MiB of them took 1.2 GB; a zstd frame of a few KiB holds
# 64 MiB of them). An object of more than CONTAINERS_FREE_BELOW bytes may hold at most one
# array or map per BYTES_PER_CONTAINER bytes, which every object cafs writes that large
# keeps well within (a location alone is over 70 bytes; a tree node of 1024 entries
# without spans, three arrays each, is some 30 KiB), so decoding takes at most a few
# times the object's size.
CONTAINERS_FREE_BELOW = 1 << 20
BYTES_PER_CONTAINER = 16


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes | memoryview, what: str, *, max_bytes: int = MAX_OBJECT_BYTES) -> Any:
    if len(data) > max_bytes:
        fail(what, f"{len(data)} bytes is over the limit of {max_bytes}")
    hooks: dict[str, Any] = {}
    if len(data) > CONTAINERS_FREE_BELOW:
        left = len(data) // BYTES_PER_CONTAINER

        def count(container: Any) -> Any:
            nonlocal left
            left -= 1
            if left < 0:
                fail(what, f"more arrays and maps than {len(data)} bytes of cafs metadata hold")
            return container

        hooks = {"list_hook": count, "object_hook": count}
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_ext_len=0,
            **hooks,
        )
    except FormatError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        fail(what, f"not valid msgpack ({type(exc).__name__}: {exc})")


def fail(what: str, why: str) -> NoReturn:
    raise FormatError(f"{what}: {why}")


def expect_list(value: Any, what: str, *, length: int | None = None, max_len: int = 1 << 24) -> list[Any]:
    if not isinstance(value, list):
        fail(what, f"expected an array, got {type(value).__name__}")
    if length is not None and len(value) != length:
        fail(what, f"expected {length} fields, got {len(value)}")
    if len(value) > max_len:
        fail(what, f"{len(value)} items is over the limit of {max_len}")
    return value


def expect_int(value: Any, what: str, *, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(value) is not int:
        fail(what, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        fail(what, f"{value} is outside [{lo}, {hi}]")
    return value


def expect_bytes(value: Any, what: str, *, min_len: int = 0, max_len: int = 1 << 20) -> bytes:
    if type(value) is not bytes:
        fail(what, f"expected bytes, got {type(value).__name__}")
    if not min_len <= len(value) <= max_len:
        fail(what, f"length {len(value)} is outside [{min_len}, {max_len}]")
    return value


def expect_str(value: Any, what: str, *, max_len: int = 4096) -> str:
    if type(value) is not str:
        fail(what, f"expected a string, got {type(value).__name__}")
    if len(value) > max_len:
        fail(what, f"length {len(value)} is over {max_len}")
    return value


def expect_map(value: Any, what: str, *, required: set[str], optional: set[str] = frozenset()) -> dict[str, Any]:  # type: ignore[assignment]
    if not isinstance(value, dict):
        fail(what, f"expected a map, got {type(value).__name__}")
    keys = set(value)
    if missing := required - keys:
        fail(what, f"missing fields {sorted(missing)}")
    if extra := keys - required - set(optional):
        fail(what, f"unknown fields {sorted(extra)}")
    return value

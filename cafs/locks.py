"""Repository locks: imports share, gc is exclusive.

A lock is an object ``locks/<random hex>`` holding msgpack
``{"v": 1, "kind": "shared"|"exclusive", "host": str, "pid": int, "time_ns": int}``.
Taking a lock writes it, then lists the others: a shared lock yields to any live
exclusive lock, an exclusive lock to any live lock. Two writers that race both see each
other and both back off, so a gc never runs beside an import (the scheme restic uses;
it needs no atomic operation beyond put, list and delete, so it works on every store).

A holder refreshes its lock (rewrites ``time_ns``) every ``REFRESH`` seconds; a lock not
refreshed for ``STALE`` seconds, or held by a process that no longer exists on this
host, is stale and ignored (and removed by the next exclusive locker).

A lock that is listed but cannot be read (the store fails to answer for it until the
deadline) is not taken for no lock: its holder may be writing, so taking a lock then
fails with the store's error. Only a lock gone between the listing and the read (its
holder let go) or one that does not decode (not written by cafs) counts as none.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cafs.errors import CafsError, FormatError, ObjectNotFound, StoreError
from cafs.format.strict import expect_int, expect_map, expect_str, pack, unpack
from cafs.stores import Store

REFRESH = 60.0
STALE = 30 * 60.0
PID_MAX = (1 << 31) - 1  # pid_t; a lock naming another pid (0 is a process group) is no lock


class RepositoryLocked(CafsError):
    """Another process holds a conflicting lock."""


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str
    host: str
    pid: int
    time_ns: int

    def describe(self) -> str:
        age = (time.time_ns() - self.time_ns) / 1e9
        return f"{self.kind} lock of pid {self.pid} on {self.host}, refreshed {age:.0f} s ago"

    def stale(self) -> bool:
        if (time.time_ns() - self.time_ns) / 1e9 > STALE:
            return True
        if self.host == os.uname().nodename:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def _encode(kind: str) -> bytes:
    return pack({"v": 1, "kind": kind, "host": os.uname().nodename[:255], "pid": os.getpid(),
                 "time_ns": time.time_ns()})


def read_locks(store: Store, *, own: str | None = None) -> list[LockInfo]:
    """The locks held on the repository, but ``own``. Raises the store's error for one
    that is listed but cannot be read: whether it is held cannot be told."""
    locks = []
    for key, _size in store.list("locks/"):
        if key == own:
            continue
        try:
            data = store.get(key)
        except ObjectNotFound:
            continue  # released since the listing
        except StoreError as exc:
            raise type(exc)(f"{exc}: cannot tell whether that lock is held; nothing was done, "
                            "try again later") from None
        try:
            m = expect_map(unpack(data, key, max_bytes=4096), key,
                           required={"v", "kind", "host", "pid", "time_ns"})
            kind = expect_str(m["kind"], key)
            if kind not in ("shared", "exclusive"):
                raise FormatError(f"{key}: unknown lock kind {kind!r}")
            locks.append(LockInfo(key, kind, expect_str(m["host"], key), expect_int(m["pid"], key, lo=1, hi=PID_MAX),
                                  expect_int(m["time_ns"], key)))
        except FormatError:
            continue  # garbage: not a lock anyone holds
    return locks


@contextmanager
def locked(store: Store, kind: str) -> Iterator[None]:
    """Hold a ``shared`` or ``exclusive`` lock on the repository for the block."""
    key = f"locks/{os.urandom(16).hex()}"
    store.put(key, _encode(kind))
    try:
        for other in read_locks(store, own=key):
            if other.stale():
                if kind == "exclusive":
                    store.delete(other.key)
                continue
            if kind == "exclusive" or other.kind == "exclusive":
                raise RepositoryLocked(f"{store.url}: in use ({other.describe()}); try again later")
        stop = threading.Event()
        refresher = threading.Thread(target=_refresh, args=(store, key, kind, stop), daemon=True,
                                     name="cafs-lock")
        refresher.start()
        try:
            yield
        finally:
            stop.set()
            refresher.join()
    finally:
        store.delete(key)


def _refresh(store: Store, key: str, kind: str, stop: threading.Event) -> None:
    while not stop.wait(REFRESH):
        try:
            store.put(key, _encode(kind))
        except StoreError:
            pass  # the next refresh may succeed; a lock that goes stale only weakens safety later

"""Repository locks: imports share, gc is exclusive.

A lock is an object ``locks/<random hex>`` holding msgpack
``{"v": 1, "kind": "shared"|"exclusive", "host": str, "pid": int, "time_ns": int}``.
Taking a lock writes it, then lists the others: a shared lock yields to any live
exclusive lock, an exclusive lock to any live lock. Two writers that race both see each
other and both back off, so a gc never runs beside an import (the scheme restic uses;
it needs no atomic operation beyond put, list and delete, so it works on every store).

A holder refreshes its lock (rewrites ``time_ns``) every ``REFRESH`` seconds; a lock not
refreshed for ``STALE`` seconds, or held by a process that no longer exists, is stale and
ignored (and removed by the next exclusive locker).

Whether the process exists is asked only where its pid means the same process: on the
same machine, since the same boot, in the same pid namespace. A host name does not say
so: containers with the host's network (Kubernetes ``hostNetwork``, ``docker --network
host``) share its name but not its pids, and cloned machines share names too. So
``host`` is the node name followed by `` boot=<boot id> pidns=<pid namespace inode>``
(``/proc/sys/kernel/random/boot_id``, ``/proc/self/ns/pid``); a lock whose ``host`` does
not end so (an older cafs, or a system without those files) is judged by its age alone.
The field keeps its type, so an older cafs reads such a lock as one of another host and
leaves it alone.

A holder that lost its lock (an exclusive locker took it for stale and removed it:
after ``STALE`` seconds without a refresh, as when the holder was suspended or its store
was away that long, or across hosts whose clocks differ by that much) may have had what
it wrote removed with it. ``HeldLock.check`` says so (``LockLost``): an import calls it
before it commits, a gc before it deletes anything. The refresher never puts back a lock
it finds gone, nor one it could not refresh for ``STALE - REFRESH`` seconds.

A lock that is listed but cannot be read (the store fails to answer for it until the
deadline) is not taken for no lock: its holder may be writing, so taking a lock then
fails with the store's error. Only a lock gone between the listing and the read (its
holder let go) or one that does not decode (not written by cafs) counts as none.
"""

from __future__ import annotations

import functools
import os
import re
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


class LockLost(CafsError):
    """The lock this process held was removed by another (taken for stale), or could not
    be refreshed for so long that it may have been: what it guarded may be gone."""


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.cache
def _this_host() -> str:
    """``host`` of the locks this process writes (see the module docstring); the same
    for the life of the process, so read once."""
    name = os.uname().nodename[:160]
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return name
    if not boot or not re.fullmatch(r"[0-9a-f-]{1,64}", boot):
        return name
    return f"{name} boot={boot} pidns={pidns}"


_SPACE = re.compile(r"(?P<name>.*) boot=[0-9a-f-]{1,64} pidns=[0-9]{1,20}")


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: str
    host: str
    pid: int
    time_ns: int

    def describe(self) -> str:
        age = (time.time_ns() - self.time_ns) / 1e9
        space = _SPACE.fullmatch(self.host)
        host = space["name"] if space else self.host
        return f"{self.kind} lock of pid {self.pid} on {host}, refreshed {age:.0f} s ago"

    def stale(self) -> bool:
        if (time.time_ns() - self.time_ns) / 1e9 > STALE:
            return True
        # the pid is asked about only where it names the same process (module docstring)
        if _SPACE.fullmatch(self.host) and self.host == _this_host():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False


def _encode(kind: str) -> bytes:
    return pack({"v": 1, "kind": kind, "host": _this_host(), "pid": os.getpid(),
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


class HeldLock:
    """A lock this process holds (what ``locked`` yields); refreshed by a thread."""

    def __init__(self, store: Store, key: str, kind: str) -> None:
        self.store = store
        self.key = key
        self.kind = kind
        self._refreshed = time.monotonic()  # when the last write of the lock began
        self._lost: str | None = None
        self._stop = threading.Event()

    def check(self) -> None:
        """Raise LockLost unless the lock is still held: it is in the store, and it was
        refreshed recently enough that no other process can have taken it for stale.
        Raises the store's error when it cannot be told."""
        self._check_age()
        if self._lost is None:
            self._check_present()
        if self._lost is not None:
            raise LockLost(f"{self.store.url}: lost this process's {self.kind} lock ({self.key}): {self._lost}; "
                           "what it wrote may have been removed with it (a gc); nothing more was done, run it again")

    def _check_present(self) -> None:
        """Mark the lock lost if the store no longer has it; the store's errors propagate."""
        try:
            self.store.get(self.key)
        except ObjectNotFound:
            self._lost = "removed by another process, which took it for stale"

    def _check_age(self) -> None:
        since = time.monotonic() - self._refreshed
        if self._lost is None and since >= STALE - REFRESH:
            self._lost = f"not refreshed for {since:.0f} s"

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH):
            self._check_age()
            if self._lost is not None:
                return  # never put back a lock another process may have taken for stale
            began = time.monotonic()
            try:
                self._check_present()
            except StoreError:
                continue  # the next refresh may succeed
            if self._lost is not None:
                return
            try:
                self.store.put(self.key, _encode(self.kind))
            except StoreError:
                continue
            self._refreshed = began


@contextmanager
def locked(store: Store, kind: str) -> Iterator[HeldLock]:
    """Hold a ``shared`` or ``exclusive`` lock on the repository for the block; call the
    ``HeldLock``'s ``check`` before a write that must not happen without it."""
    key = f"locks/{os.urandom(16).hex()}"
    held = HeldLock(store, key, kind)
    store.put(key, _encode(kind))
    try:
        for other in read_locks(store, own=key):
            if other.stale():
                if kind == "exclusive":
                    store.delete(other.key)
                continue
            if kind == "exclusive" or other.kind == "exclusive":
                raise RepositoryLocked(f"{store.url}: in use ({other.describe()}); try again later")
        refresher = threading.Thread(target=held._refresh, daemon=True, name="cafs-lock")
        refresher.start()
        try:
            yield held
        finally:
            held._stop.set()
            refresher.join()
    finally:
        store.delete(key)

"""Where a repository's bytes come from: its store and its mirrors, tried in turn, with
retries, back-off and a deadline.

``Sources.read(fn)`` calls ``fn(store)`` on the first usable source in the configured
order (the repository's own store, then each mirror). ``fn`` reads and verifies; when it
raises (``StoreError``, or ``IntegrityError``/``FormatError`` for bytes that fail
verification), the source is set aside for a back-off period that grows with its
consecutive failures (with jitter) and the read moves on to the next source. Once that
period has passed the source is tried again in its own place, so reads return to the
primary as soon as it is back; a source in back-off is still tried, last, before a read
gives up. When every source has failed and at least one failure may pass (unavailable
store), the read waits (exponential back-off with full jitter) and goes round again
until its deadline (``give_up``, a ``time.monotonic()`` instant, where the caller's
deadline began earlier), then raises the last error; an attempt under way at the
deadline ends by its store's own request timeout. Bytes that fail verification are read
again ``CORRUPT_ROUNDS`` times at most (a flipped bit in transit heals, a damaged object
does not). Failures no retry cures — an object missing everywhere (``ObjectNotFound``),
refused credentials — are raised at once. A mirror found to hold another repository
(``OtherRepository``) is no source of this one: an object the others lack is
``ObjectNotFound``, not that mirror's error.

With ``missing_ends``, an object the repository's own store (the first source configured)
answers it does not have is ``ObjectNotFound`` once every source has been asked, though
a mirror failed otherwise (down, another repository, damaged bytes): for callers that
look for what the store lacks elsewhere in it (an object gc moved, found by id; the end
of a journal). A mirror is a copy and never ahead of its repository, so waiting out the
deadline for one that is down would fail a read the repository itself can serve.

``ListingUnavailable`` from the repository's own store is raised at once, and the store
is not set aside: it is an answer (that store cannot list keys), not a failure, and a
mirror's listing is not the repository's (it may lag behind: its newest snapshot is an
older one). Callers find objects by name instead. From a mirror it is that mirror's
failure.

``RetryingStore`` gives writes the same patience on one store: an operation that meets
``StoreUnavailable`` is retried with back-off until the deadline; its ``read(fn)`` is
``Sources.read`` of that one store, for reads that verify what they get.

Thread-safe: the health table is guarded by a lock; reads themselves run unlocked.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from cafs.errors import (
    FormatError, IntegrityError, ListingUnavailable, ObjectNotFound, OtherRepository, StoreError, StoreUnavailable,
)
from cafs.stores.base import Store

log = logging.getLogger("cafs.sources")

T = TypeVar("T")

DEFAULT_DEADLINE = 30.0
_ROUND_DELAY = (0.05, 2.0)  # first and largest wait between rounds, before jitter
_SET_ASIDE = (1.0, 30.0)  # first and largest back-off of a failed source
CORRUPT_ROUNDS = 4


@dataclass
class _Health:
    failures: int = 0
    retry_at: float = 0.0


class Sources:
    def __init__(self, stores: list[Store], *, deadline: float = DEFAULT_DEADLINE) -> None:
        if not stores:
            raise ValueError("Sources needs at least one store")
        self.stores = stores
        self.deadline = deadline
        self._health = [_Health() for _ in stores]
        self._lock = threading.Lock()
        # Jitter of its own: the module's shared generator is global state, which other
        # code (hypothesis, a seeded simulation) may rely on being left alone.
        self._jitter = random.Random()

    def order(self) -> list[int]:
        """Indexes of the sources to try: usable ones in configured order, then those in
        back-off, soonest first."""
        now = time.monotonic()
        with self._lock:
            ready = [i for i, h in enumerate(self._health) if h.retry_at <= now]
            waiting = sorted((i for i, h in enumerate(self._health) if h.retry_at > now),
                             key=lambda i: self._health[i].retry_at)
        return ready + waiting

    def read(self, fn: Callable[[Store], T], *, give_up: float | None = None, missing_ends: bool = False) -> T:
        if give_up is None:
            give_up = time.monotonic() + self.deadline
        for round_no in itertools.count():
            error: Exception | None = None
            missing: ObjectNotFound | None = None
            missing_first: ObjectNotFound | None = None  # the answer of the first source configured
            other: OtherRepository | None = None
            passing = corrupt = False
            for i in self.order():
                try:
                    value = fn(self.stores[i])
                except ObjectNotFound as exc:
                    missing = exc
                    if i == 0:
                        missing_first = exc
                    continue
                except (StoreError, IntegrityError, FormatError) as exc:
                    if i == 0 and isinstance(exc, ListingUnavailable):
                        raise
                    passing = passing or isinstance(exc, StoreUnavailable)
                    corrupt = corrupt or isinstance(exc, (IntegrityError, FormatError))
                    self._failed(i, exc)
                    if isinstance(exc, OtherRepository):
                        other = exc  # no source of this repository: what the others lack is missing
                    else:
                        error = exc
                    continue
                self._succeeded(i)
                return value
            if error is None:
                if missing is None:
                    assert other is not None
                    raise other
                raise missing
            if missing_ends and missing_first is not None:
                raise missing_first
            now = time.monotonic()
            if now >= give_up or not (passing or (corrupt and round_no < CORRUPT_ROUNDS)):
                raise error
            time.sleep(min(give_up - now, _backoff(round_no, _ROUND_DELAY) * self._jitter.random()))
        raise AssertionError("unreachable")

    def _failed(self, i: int, exc: Exception) -> None:
        with self._lock:
            h = self._health[i]
            h.failures += 1
            h.retry_at = time.monotonic() + _backoff(h.failures - 1, _SET_ASIDE) * self._jitter.uniform(0.5, 1.0)
        if len(self.stores) > 1:
            log.warning("source %s failed (%s); trying the next", self.stores[i].url, exc)

    def _succeeded(self, i: int) -> None:
        h = self._health[i]
        if h.failures:
            with self._lock:
                h.failures = 0
                h.retry_at = 0.0


class RetryingStore:
    """A store whose operations are retried on ``StoreUnavailable`` until a deadline:
    ``Sources`` of one store."""

    def __init__(self, inner: Store, *, deadline: float = DEFAULT_DEADLINE) -> None:
        self.inner = inner
        self.url = inner.url
        self._sources = Sources([inner], deadline=deadline)

    def _retry(self, fn: Callable[[], T]) -> T:
        return self._sources.read(lambda _store: fn())

    def read(self, fn: Callable[[Store], T]) -> T:
        """``fn(store)``, which reads and verifies, retried as ``Sources.read`` retries:
        on ``StoreUnavailable`` until the deadline, and when it finds bytes that fail
        verification (raises ``IntegrityError`` or ``FormatError``) ``CORRUPT_ROUNDS``
        times at most, so a byte flipped on the way is not taken for a damaged object."""
        return self._sources.read(fn)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._retry(lambda: self.inner.get(key, offset, length))

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        self._retry(lambda: self.inner.put(key, data, exclusive=exclusive))

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return iter(self._retry(lambda: list(self.inner.list(prefix))))

    def delete(self, key: str) -> None:
        self._retry(lambda: self.inner.delete(key))


def _backoff(attempt: int, bounds: tuple[float, float]) -> float:
    first, largest = bounds
    return float(min(largest, first * (2 ** min(attempt, 30))))

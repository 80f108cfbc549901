"""Chunks read ahead of a reader that asks for them in an order known beforehand
(``cafs get`` and ``cafs cat`` of a remote snapshot).

One chunk at a time, a remote store costs its first-byte latency (10-200 ms) per chunk:
a get of 10,000 small files behind 20 ms took 209 s. ``ChunksAhead(repo, plan)`` takes
``plan``, the chunk locations the reader will ask for in the order it will ask, and reads
them ahead: neighbouring chunks of one pack as one ranged read of up to ``RUN_BYTES``
(``Repository.read_run``, so every chunk is verified against its id), ``READERS`` reads at
a time in worker threads, with at most ``AHEAD_BYTES`` read or being read and not yet
taken. ``read(loc)`` returns a chunk's verified plain bytes.

The plan is a forecast, not a promise: the reader may skip chunks (a file already right
on disk) and ask for ones the plan lacks. Asking for a planned chunk drops the planned
chunks before it (the reader is past them); one that is not planned, or not yet, is read
alone there and then (``Repository.read_object``). A run that failed is read again chunk
by chunk as its chunks are asked for, so an error names the chunk it is about (a run
fails as a whole for one damaged chunk), except ``StoreUnavailable``, raised as it is:
asking again would wait out the same store's deadline twice.

From a repository on a local disk, nothing is read ahead: ``read`` reads each chunk
alone, and ``plan`` is never advanced.

Threads: ``plan`` is advanced only in the thread that calls ``read`` (it may read nodes
through a ``NodeReader``, which is not thread-safe). The workers are daemon threads, so a
read stalled in the store never keeps the process from exiting; ``close`` stops them
once their current read ends.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from cafs.errors import StoreUnavailable
from cafs.format.location import Location
from cafs.repository import Repository

READERS = 8
RUN_BYTES = 8 << 20  # as the mount's fetcher: requests of several MiB
RUN_GAP = 128 << 10  # bytes between two chunks read over rather than split into two reads
AHEAD_BYTES = 64 << 20


@dataclass(eq=False)
class _Run:
    """Chunks of one pack read together: set ``done`` once ``plain`` or ``error`` is."""

    locs: list[Location]
    done: threading.Event = field(default_factory=threading.Event)
    plain: list[bytes] | None = None
    error: Exception | None = None
    untaken: int = 0  # its planned chunks neither taken nor dropped yet

    @property
    def length(self) -> int:
        return self.locs[-1].end - self.locs[0].offset


@dataclass
class _Slot:
    """One planned chunk: its run and its place in it."""

    loc: Location
    run: _Run
    index: int


class ChunksAhead:
    def __init__(self, repo: Repository, plan: Iterable[Location], *, readers: int = READERS,
                 ahead_bytes: int = AHEAD_BYTES) -> None:
        self.repo = repo
        # a local disk has no latency to hide: every chunk is read alone, the plan never advanced
        self._plan: Iterator[Location] | None = iter(plan) if repo.local_root is None else None
        self._readers = readers
        self._ahead_bytes = ahead_bytes
        self._slots: deque[_Slot] = deque()  # planned, in the order the reader will ask
        self._planned: Counter[tuple[bytes, int]] = Counter()  # (pack, offset) of each slot
        self._ahead = 0  # bytes of runs handed to the workers and not all taken
        self._open: list[Location] = []  # a run being gathered from the plan
        self._last_id: bytes | None = None
        self._queue: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._workers = 0

    def read(self, loc: Location) -> bytes:
        """The verified plain bytes of the chunk at ``loc``."""
        self._top_up()
        key = (loc.pack, loc.offset)
        if not self._planned[key]:
            return self.repo.read_object(loc)
        while True:
            slot = self._take()
            if (slot.loc.pack, slot.loc.offset) == key:
                break
        self._top_up()
        run = slot.run
        run.done.wait()
        if run.plain is not None:
            return run.plain[slot.index]
        if isinstance(run.error, StoreUnavailable):
            raise run.error
        return self.repo.read_object(loc)

    def close(self) -> None:
        """Stop the workers once their current reads end; drop what was read ahead."""
        self._plan = None
        self._slots.clear()
        for _ in range(self._workers):
            self._queue.put(None)
        self._workers = 0

    # -- planning ---------------------------------------------------------------------

    def _top_up(self) -> None:
        """Hand runs of the plan to the workers until ``AHEAD_BYTES`` are under way."""
        while self._plan is not None and self._ahead < self._ahead_bytes:
            loc = next(self._plan, None)
            if loc is None:
                self._plan = None
                self._send()
                return
            if loc.id == self._last_id:
                continue  # a repeat (a sparse file's zeros): the reader keeps the chunk it has
            self._last_id = loc.id
            if self._open and not self._extends(loc):
                self._send()
            self._open.append(loc)

    def _extends(self, loc: Location) -> bool:
        """Whether ``loc`` joins the run being gathered."""
        first, last = self._open[0], self._open[-1]
        return (loc.pack == last.pack and last.end <= loc.offset <= last.end + RUN_GAP
                and loc.end - first.offset <= RUN_BYTES)

    def _send(self) -> None:
        """Hand the run being gathered to the workers."""
        if not self._open:
            return
        run = _Run(self._open, untaken=len(self._open))
        self._open = []
        for i, loc in enumerate(run.locs):
            self._slots.append(_Slot(loc, run, i))
            self._planned[(loc.pack, loc.offset)] += 1
        self._ahead += run.length
        if self._workers < self._readers:
            self._workers += 1
            threading.Thread(target=self._work, name="cafs-readahead", daemon=True).start()
        self._queue.put(run)

    def _take(self) -> _Slot:
        """The first planned chunk, no longer planned."""
        slot = self._slots.popleft()
        key = (slot.loc.pack, slot.loc.offset)
        self._planned[key] -= 1
        if not self._planned[key]:
            del self._planned[key]
        slot.run.untaken -= 1
        if not slot.run.untaken:
            self._ahead -= slot.run.length
        return slot

    # -- the workers ------------------------------------------------------------------

    def _work(self) -> None:
        while (run := self._queue.get()) is not None:
            try:
                run.plain = [bytes(plain) for _stored, plain in self.repo.read_run(run.locs, missing_ends=True)]
            except Exception as exc:  # read again chunk by chunk, for an error about each
                run.error = exc
            finally:
                run.done.set()


def read_in_order(repo: Repository, spans: Sequence[Location]) -> Iterator[bytes]:
    """The verified plain bytes of ``spans``, one after the other (a file's chunks, for
    ``cafs cat``): read ahead from a remote repository; a repeat of the chunk before (a
    sparse file's zeros) is not read again."""
    ahead = ChunksAhead(repo, spans)
    last: tuple[bytes, bytes] | None = None
    try:
        for span in spans:
            if last is None or last[0] != span.id:
                last = (span.id, ahead.read(span))
            yield last[1]
    finally:
        ahead.close()

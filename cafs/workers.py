"""Worker threads for blocking calls made from trio, with cheap hand-offs.

``trio.to_thread.run_sync`` costs about 135 us of CPU and 12 context switches per call
beyond the work itself on a 2-core machine (a lock hand-off per call, the thread renamed
twice, one wake-up of the loop per result, and the GIL passed back and forth on each),
more than the 100 KB pread and hash a small-file read carries. A ``WorkerPool`` keeps
its threads, feeds them from one queue, and wakes the loop once for all the results that
finished meanwhile: about 45-55 us and 2-5 switches per call
(``benchmarks/handoff_bench.py`` measures both).

Contract:

- ``await pool.run(fn, *args)`` runs ``fn(*args)`` in one of the pool's threads and
  returns its result or raises its exception in the calling task.
- At most ``threads`` calls run at once; more wait in the queue, in order. A pool is
  its own limiter: blocking work that must not wait behind another kind (cache reads
  behind a stalled store) gets a pool of its own.
- Like ``trio.to_thread.run_sync``, a call is not cancellable: a cancelled caller waits
  for ``fn`` to return, since abandoning it would leave its resources to nobody. Unless
  ``abandon_on_cancel``: for a call whose result may simply be dropped (a store read
  that allocates nothing but its answer), a cancelled caller leaves at once and ``fn``
  finishes on its own, still holding its thread until then (``abandoned`` counts those,
  so that a caller can keep from queueing behind them).
- Threads start on demand and end after ``IDLE_SECONDS`` without work. They are daemon
  threads, so a call stalled in a store never keeps the process from exiting; nothing
  needs closing.
- A pool may serve several trio runs (one after another, as tests do): each result goes
  back to the run that asked for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import trio

T = TypeVar("T")

IDLE_SECONDS = 10.0


class _Job(Generic[T]):
    __slots__ = ("fn", "args", "token", "done", "result", "error", "finished", "abandoned")

    def __init__(self, fn: Callable[..., T], args: tuple[Any, ...], token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.args = args
        self.token = token
        self.done = trio.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.finished = self.abandoned = False  # under the pool's lock


class WorkerPool:
    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"a worker pool needs at least one thread, not {threads}")
        self.threads = threads
        self.name = name
        self._jobs: queue.SimpleQueue[_Job[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live = 0  # threads started and not yet ended
        self._busy = 0  # threads running a job
        self._backlog = 0  # jobs queued, not yet taken by a thread
        self._abandoned = 0  # jobs whose callers left, queued or running
        self._finished: dict[trio.lowlevel.TrioToken, list[_Job[Any]]] = {}

    async def run(self, fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
        job: _Job[T] = _Job(fn, args, trio.lowlevel.current_trio_token())
        self._submit(job)
        with trio.CancelScope(shield=not abandon_on_cancel):
            try:
                await job.done.wait()
            except trio.Cancelled:
                self._abandon(job)
                raise
        if job.error is not None:
            raise job.error
        return job.result  # type: ignore[return-value]

    @property
    def abandoned(self) -> int:
        """Calls whose callers left (``abandon_on_cancel``) that have not finished: each
        holds a thread, or will."""
        return self._abandoned

    def _abandon(self, job: _Job[Any]) -> None:
        with self._lock:
            if not job.finished:
                job.abandoned = True
                self._abandoned += 1

    def _submit(self, job: _Job[Any]) -> None:
        with self._lock:
            self._backlog += 1
            start = self._live - self._busy < self._backlog and self._live < self.threads
            if start:
                self._live += 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._work, name=f"cafs-{self.name}", daemon=True).start()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._backlog == 0:
                        self._live -= 1
                        return
                continue
            with self._lock:
                self._backlog -= 1
                self._busy += 1
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # delivered to the caller, who decides
                job.error = exc
            job.fn = job.args = None  # type: ignore[assignment]  # drop references early
            with self._lock:
                self._busy -= 1
                job.finished = True
                self._abandoned -= job.abandoned
                done = self._finished.setdefault(job.token, [])
                wake = not done
                done.append(job)
            if wake:
                try:
                    job.token.run_sync_soon(self._deliver, job.token)
                except trio.RunFinishedError:
                    with self._lock:
                        self._finished.pop(job.token, None)  # nobody is left to wait

    def _deliver(self, token: trio.lowlevel.TrioToken) -> None:
        """On the trio thread: wake every caller whose job has finished."""
        with self._lock:
            done = self._finished.pop(token, [])
        for job in done:
            job.done.set()

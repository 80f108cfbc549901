"""WorkerPool: results and errors reach the caller, the thread count bounds concurrency,
calls are not cancellable unless abandoned, idle threads end, and one pool serves successive trio runs."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from cafs import workers
from cafs.workers import WorkerPool


async def test_results_and_errors_reach_their_callers() -> None:
    pool = WorkerPool(3, "t")
    results: dict[int, object] = {}

    def work(i: int) -> int:
        time.sleep(0.001 * (i % 3))
        if i % 5 == 0:
            raise KeyError(i)
        return i * i

    async def call(i: int) -> None:
        try:
            results[i] = await pool.run(work, i)
        except KeyError as exc:
            results[i] = exc

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(call, i)
    for i in range(50):
        if i % 5 == 0:
            error = results[i]
            assert isinstance(error, KeyError) and error.args == (i,)
        else:
            assert results[i] == i * i


async def test_threads_bound_how_many_calls_run_at_once() -> None:
    pool = WorkerPool(2, "t")
    lock = threading.Lock()
    running = peak = 0
    names: set[str] = set()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            names.add(threading.current_thread().name)
        time.sleep(0.01)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(pool.run, work)
    assert peak == 2
    assert names == {"cafs-t"}
    assert threading.current_thread().name not in names


async def test_a_cancelled_caller_waits_for_its_call() -> None:
    pool = WorkerPool(1, "t")
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.2)
        finished.set()
        return "done"

    with trio.move_on_after(0.01) as scope:
        assert await pool.run(slow) == "done"
    assert finished.is_set()
    assert not scope.cancelled_caught  # the shield held: the call was not abandoned


async def test_an_abandoning_caller_leaves_at_once_and_the_call_finishes() -> None:
    pool = WorkerPool(1, "t")
    release, finished = threading.Event(), threading.Event()

    def stalled() -> None:
        release.wait(10)
        finished.set()

    with trio.move_on_after(0.01) as scope:
        await pool.run(stalled, abandon_on_cancel=True)
    assert scope.cancelled_caught and not finished.is_set()
    assert pool.abandoned == 1  # its thread is still taken
    release.set()
    assert await pool.run(lambda: "next") == "next"  # after the abandoned call, on its thread
    assert finished.is_set() and pool.abandoned == 0


def test_one_pool_serves_successive_runs_and_idle_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "IDLE_SECONDS", 0.05)
    pool = WorkerPool(4, "idle")

    async def some_calls(base: int) -> list[int]:
        out: list[int] = []

        async def one(i: int) -> None:
            out.append(await pool.run(lambda: base + i))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        return sorted(out)

    assert trio.run(some_calls, 0) == list(range(8))
    assert trio.run(some_calls, 100) == list(range(100, 108))
    deadline = time.monotonic() + 5
    while any(t.name == "cafs-idle" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "idle worker threads did not end"
        time.sleep(0.02)
    assert trio.run(some_calls, 7) == list(range(7, 15))  # and new ones start when needed


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        WorkerPool(0, "none")

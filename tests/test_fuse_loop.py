"""cafs.fuse_loop: the wait pyfuse3's request loop makes for the FUSE device, on a
socket pair standing in for it (the real device is exercised by every mount test)."""

from __future__ import annotations

import socket

import pyfuse3
import pytest
import trio
import trio.testing

from cafs import fuse_loop


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def test_waits_until_readable(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    lowlevel = fuse_loop.trio_view(budget=4).lowlevel
    with trio.move_on_after(0.2) as scope:
        await lowlevel.wait_readable(a.fileno())
    assert scope.cancelled_caught, "returned with nothing to read"
    b.send(b"x")
    with trio.fail_after(5):
        await lowlevel.wait_readable(a.fileno())


async def test_a_stream_of_requests_lets_other_tasks_run(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"x")  # always readable: every wait could return at once
    lowlevel = fuse_loop.trio_view(budget=8).lowlevel
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await trio.lowlevel.checkpoint()
            turns += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        start = turns
        for _ in range(80):
            await lowlevel.wait_readable(a.fileno())
        ran = turns - start
        nursery.cancel_scope.cancel()
    assert 5 <= ran <= 20, f"the other task ran {ran} times during 80 waits with a budget of 8"


async def test_cancellation_reaches_a_stream_of_waits(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.send(b"x")
    lowlevel = fuse_loop.trio_view(budget=8).lowlevel
    waits = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(100):
            await lowlevel.wait_readable(a.fileno())
            waits += 1
    assert scope.cancelled_caught and waits < 8


def test_install_gives_pyfuse3_the_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "trio", trio)
    fuse_loop.install()
    view = pyfuse3.trio  # type: ignore[attr-defined]
    assert isinstance(view.lowlevel, fuse_loop._Lowlevel)
    assert view.Lock is fuse_loop._BargingLock and view.ClosedResourceError is trio.ClosedResourceError
    assert view.lowlevel.current_trio_token is trio.lowlevel.current_trio_token


async def test_a_free_lock_is_taken_without_letting_other_tasks_run() -> None:
    lock = fuse_loop._BargingLock()
    ran = False

    async def other_task() -> None:
        nonlocal ran
        ran = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        for _ in range(10):
            async with lock:
                pass
        assert not ran, "taking a free lock went through the scheduler"


async def test_the_releasing_task_takes_the_lock_back_before_a_woken_waiter_runs() -> None:
    lock = fuse_loop._BargingLock()
    order: list[str] = []

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()  # the waiter is parked on the lock
        async with lock:  # it was woken by the release, but has not run: taken back
            order.append("holder")
            await trio.testing.wait_all_tasks_blocked()  # it ran, found the lock held, parked again
        # a trio.Lock would have handed it to the waiter at the first release
    assert order == ["holder", "waiter"]


async def test_every_waiter_gets_the_lock_in_turn() -> None:
    lock = fuse_loop._BargingLock()
    holders: list[int] = []
    inside = 0

    async def task(i: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1, "two tasks held the lock at once"
            holders.append(i)
            await trio.sleep(0)
            inside -= 1

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(task, i)
    assert sorted(holders) == list(range(20))


async def test_a_cancelled_waiter_leaves_the_lock_to_the_others() -> None:
    lock = fuse_loop._BargingLock()
    got: list[str] = []

    async def waiter(name: str, scope: trio.CancelScope) -> None:
        with scope:
            async with lock:
                got.append(name)

    first, second = trio.CancelScope(), trio.CancelScope()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(waiter, "first", first)
                nursery.start_soon(waiter, "second", second)
                await trio.testing.wait_all_tasks_blocked()
                first.cancel()
                await trio.testing.wait_all_tasks_blocked()
    assert got == ["second"]

"""cafs.fuse_loop: the wait pyfuse3's request loop makes for the FUSE device, on a
socket pair standing in for it (the real device is exercised by every mount test)."""

from __future__ import annotations

import socket

import pyfuse3
import pytest
import trio

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
    assert view.Lock is trio.Lock and view.ClosedResourceError is trio.ClosedResourceError
    assert view.lowlevel.current_trio_token is trio.lowlevel.current_trio_token

"""A cheaper wait for the FUSE device in pyfuse3's request loop.

Before each request, pyfuse3's loop waits for ``/dev/fuse`` to be readable with trio's
``wait_readable``: an epoll registration and a trip through trio's scheduler, per request,
even when the next request is already waiting. For a warm small file (an open and a
release) that was about a quarter of the daemon's CPU.

pyfuse3 reaches trio through its module attribute ``pyfuse3.trio``, the hook
``pyfuse3.asyncio`` uses to swap in asyncio. ``install()`` puts there a view of trio whose
``lowlevel.wait_readable`` first polls the descriptor without blocking and returns at
once if a request is waiting. Every ``BUDGET``-th call, and whenever nothing is waiting,
it waits through trio's own ``wait_readable``, which lets other tasks run (worker results,
signals, timers) and is where cancellation is delivered: a stream of requests never
starves the rest of the loop. Everything else pyfuse3 uses is trio's own.
"""

from __future__ import annotations

import select
import types
from typing import Any

import pyfuse3
import trio

BUDGET = 16  # requests taken without a pass through trio's scheduler, at most
_BAD = select.POLLERR | select.POLLHUP | select.POLLNVAL  # left for trio's wait to meet


class _Lowlevel:
    """``trio.lowlevel`` with a ``wait_readable`` that returns at once for a readable
    descriptor, at most ``budget - 1`` times in a row."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._left = budget
        self._polls: dict[int, select.poll] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: int) -> None:
        if self._left > 1:
            poll = self._polls.get(fd)
            if poll is None:
                poll = self._polls[fd] = select.poll()
                poll.register(fd, select.POLLIN)
            ready = poll.poll(0)
            if ready and ready[0][1] & _BAD == 0:
                self._left -= 1
                return
        self._left = self._budget
        await trio.lowlevel.wait_readable(fd)


def trio_view(budget: int = BUDGET) -> types.ModuleType:
    """A module with trio's attributes, but a ``lowlevel`` with the cheaper wait."""
    view = types.ModuleType("cafs.fuse_loop.trio")
    view.__dict__.update((k, v) for k, v in vars(trio).items() if not k.startswith("__"))
    view.lowlevel = _Lowlevel(budget)  # type: ignore[attr-defined]
    return view


def install(budget: int = BUDGET) -> None:
    """Make pyfuse3's request loop use ``trio_view``. Call before ``pyfuse3.main``."""
    pyfuse3.trio = trio_view(budget)  # type: ignore[attr-defined]

"""How slowly an answer may arrive: bounds on a whole HTTP answer, not on one wait.

A socket timeout bounds each wait for bytes, not an answer: a server (or a proxy, or a
link gone bad) that sends a byte every few seconds kept one GET going for hours, and with
it ``cafs ls``, ``get`` or ``import`` whatever ``CAFS_TIMEOUT`` said, since a deadline is
checked only between attempts. ``Pace`` bounds the answer: its first bytes within
``timeout`` seconds of the request, then on average at least ``MIN_RATE`` bytes a second
(a slow link is fine; a trickle is not). Past that, a read raises ``TimeoutError``, an
``OSError`` like a socket timeout, which the stores report as ``StoreUnavailable``.

Uploads are bounded per piece of ``SEND_SIZE`` bytes (``send_pieces``), not as a whole.

Used by the keep-alive GETs (every raw read of the socket) and by the urllib3 requests of
the HTTP and S3 stores (``read_body``: from the answer's head on, between the reads of
its body, so there the bound may be overrun by one socket timeout). The head of an
urllib3 answer is bounded only by the socket timeout per wait (its request's body, a pack
being uploaded, may take long on a slow link, and is not paced).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import cast

import urllib3

MIN_RATE = 16 << 10  # bytes per second, on average, after the first ``timeout`` seconds
READ_SIZE = 1 << 20
SEND_SIZE = 1 << 20


class Pace:
    __slots__ = ("timeout", "started", "received")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.started = time.monotonic()
        self.received = 0

    def restart(self) -> None:
        """A new request starts now."""
        self.started = time.monotonic()
        self.received = 0

    def left(self) -> float:
        """How long the next wait for bytes may take (at most ``timeout``); raises
        ``TimeoutError`` when the answer is already too late."""
        left = self.started + self.timeout + self.received / MIN_RATE - time.monotonic()
        if left <= 0 and not self.received:
            raise TimeoutError("timed out")  # no answer at all, as a socket timeout says
        if left <= 0:
            raise TimeoutError(f"the answer came slower than {MIN_RATE >> 10} KiB/s")
        return min(self.timeout, left)

    def got(self, n: int) -> None:
        self.received += n


def send_pieces(body: memoryview) -> Iterator[bytes]:
    """``body`` in pieces of ``SEND_SIZE``, for urllib3 to send one by one (with an explicit
    ``Content-Length``, else it sends them chunked). urllib3 sends a buffer whole with one
    ``sendall``, whose timeout bounds the whole upload: a 64 MiB pack over a link slower
    than 6.4 MB/s always failed with 'timed out' at the default 10 s. Each piece now has
    the timeout to itself."""
    for start in range(0, len(body), SEND_SIZE):
        yield cast(bytes, body[start:start + SEND_SIZE])  # sent as it is, not copied; urllib3 says bytes


def read_body(resp: urllib3.BaseHTTPResponse, pace: Pace, limit: int | None = None, *,
              decode_content: bool = True) -> bytes:
    """The body of ``resp`` (requested with ``preload_content=False``), at most ``limit``
    bytes (None: all of it), read at ``pace``: ``TimeoutError`` when it comes too slowly."""
    parts: list[bytes] = []
    got = 0
    while limit is None or got < limit:
        try:
            pace.left()
        except TimeoutError:
            resp.close()  # unread bytes: the connection is not reusable
            raise
        piece = resp.read1(READ_SIZE if limit is None else min(READ_SIZE, limit - got),
                           decode_content=decode_content)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
        pace.got(len(piece))
    return b"".join(parts)

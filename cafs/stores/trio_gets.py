"""Ranged GETs on the trio loop: the fast path of a mount's small reads from a plain-HTTP store.

A cold small file read through a remote mount used to be one GET on a store worker
thread. The hand-offs between the trio thread and the workers, and among the workers
for the GIL, cost the daemon more CPU than the GET and the hash themselves (a remote
mount of 5,000 files of 100 KB: 2,000 files/s with 2.9 s of daemon CPU; on the trio
loop, 2,700-3,200 files/s with 1.7-2.1 s). ``TrioGets.get`` sends a ranged GET on a
non-blocking keep-alive socket and waits for the answer on the loop, so the thread that
serves the FUSE request also fetches its bytes.

Contract: ``get(key, offset, length)`` returns exactly those bytes, or None when this
path declines, and then the caller reads through the store's ordinary (threaded) path,
which has the retries, the mirrors, the deadline and the error messages. It declines:

- at once, when all ``connections`` are busy, for ranges over ``MAX_LENGTH``, and for a
  while after a failure (``BACKOFF`` doubling up to ``MAX_BACKOFF``, reset by a success),
  so a failing server costs the ordinary path nothing more than one timeout now and then;
- for anything but a ``206`` answer with exactly ``length`` bytes of ``Content-Length``
  body (redirects, errors, whole objects, chunked bodies): those go the ordinary way;
- on any failure on the wire (refused, reset, closed early, over ``timeout``, a head
  over ``MAX_HEAD`` bytes or not HTTP/1.x).

The bytes are not verified here: the caller checks them against their ids and calls
``failed()`` when they do not match. Only plain ``http://`` is served this way (TLS on
the loop is left to the threaded path). A connection is reused only after a complete
answer that did not ask to close it; cancelling a ``get`` closes its connection. Idle
connections are closed when the object is collected.
"""

from __future__ import annotations

import os
import socket
import time
import weakref
from typing import Any

import trio

from cafs.stores.keepalive import ack_now, host_header

MAX_LENGTH = 4 << 20
MAX_HEAD = 16 << 10
BACKOFF = 1.0
MAX_BACKOFF = 30.0


class _Declined(Exception):
    """The answer is not one this path takes; the message says why (for debugging)."""


class TrioGets:
    def __init__(self, host: str, port: int, target_prefix: str, headers: dict[str, str], *,
                 connections: int = 8, timeout: float = 5.0) -> None:
        """``target_prefix``: the request target before a key (the store's URL path,
        ending in ``/``); ``headers``: sent with every request (credentials included)."""
        self._address = (host, port)
        self._head = (f"Host: {host_header(host, port, 80)}\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in headers.items()))
        self._prefix = target_prefix
        self._limit = connections
        self._timeout = timeout
        self._idle: list[socket.socket] = []
        self._open = 0
        self._backoff = 0.0
        self._resume_at = 0.0
        weakref.finalize(self, _close_all, self._idle)

    async def get(self, key: str, offset: int, length: int) -> memoryview | None:
        if not 0 < length <= MAX_LENGTH or time.monotonic() < self._resume_at:
            return None
        if self._idle:
            sock: socket.socket | None = self._idle.pop()
        elif self._open < self._limit:
            sock = None
        else:
            return None
        self._open += 1
        request = (f"GET {self._prefix}{key} HTTP/1.1\r\n{self._head}"
                   f"Range: bytes={offset}-{offset + length - 1}\r\n\r\n").encode("latin-1")
        keep = False
        try:
            with trio.fail_after(self._timeout):
                if sock is None:
                    sock = await self._connect()
                await _send_all(sock, request)
                body, keep = await _response(sock, length)
        except (OSError, trio.TooSlowError, _Declined):
            keep = False
            self.failed()
            return None
        finally:
            self._open -= 1
            if keep and sock is not None:
                self._idle.append(sock)
            elif sock is not None:
                sock.close()
        self._backoff = 0.0
        return body

    def failed(self) -> None:
        """Decline for a while: the server failed, or sent bytes that did not verify."""
        self._backoff = min(MAX_BACKOFF, max(BACKOFF, 2 * self._backoff))
        self._resume_at = time.monotonic() + self._backoff

    async def _connect(self) -> socket.socket:
        # A host name is looked up on a worker thread (trio's getaddrinfo): connect() on
        # a name resolves it in place, and a slow resolver then stalls the loop that
        # serves every FUSE request of the mount, cached reads and ls included.
        infos = await trio.socket.getaddrinfo(*self._address, type=socket.SOCK_STREAM)
        error = OSError(f"{self._address[0]}: no address")
        for family, _type, _proto, _name, address in infos:  # as create_connection: each in turn
            try:
                return await _connected(family, address)
            except OSError as exc:
                error = exc
        raise error


async def _connected(family: int, address: tuple[Any, ...]) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(address)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


# Plain non-blocking sockets waited on through trio's I/O manager, rather than trio's
# socket objects: those may only be closed inside a trio run, and an idle connection
# is closed whenever its TrioGets is collected.

async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _recv_into(sock: socket.socket, view: memoryview) -> int:
    while True:
        try:
            return sock.recv_into(view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def _response(sock: socket.socket, length: int) -> tuple[memoryview, bool]:
    """The body of a ``206`` answer of ``length`` bytes, and whether the connection may
    be used again; anything else raises ``_Declined`` (or OSError from the socket)."""
    buf = bytearray(MAX_HEAD + length)
    view = memoryview(buf)
    got = 0
    while True:
        n = await _recv_into(sock, view[got:MAX_HEAD])
        if n == 0:
            raise _Declined("closed before the head ended")
        if not got:
            ack_now(sock)  # else a corked server waits 40 ms for our ACK (keepalive.ack_now)
        got += n
        end = buf.find(b"\r\n\r\n", 0, got)
        if end >= 0:
            break
        if got >= MAX_HEAD:
            raise _Declined("head too long")
    keep = _check_head(bytes(buf[:end]), length)
    start = end + 4
    need = start + length
    if got > need:
        raise _Declined("more bytes than the body")  # nothing was pipelined: a broken server
    while got < need:
        n = await _recv_into(sock, view[got:need])
        if n == 0:
            raise _Declined("closed in the body")
        got += n
    return view[start:need], keep


def _check_head(head: bytes, length: int) -> bool:
    """Whether the connection stays usable after this head, which must announce a
    ``206`` body of ``length`` bytes."""
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0") or status[1] != b"206":
        raise _Declined(f"answer {lines[0][:80]!r}")
    size = None
    keep = status[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise _Declined("a header line without a colon")
        name = name.strip().lower()
        if name == b"content-length":
            size = int(value) if value.strip().isdigit() else -1
        elif name == b"transfer-encoding":
            raise _Declined("an encoded body")
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep = b"keep-alive" in tokens if status[0] == b"HTTP/1.0" else b"close" not in tokens
    if size != length:
        raise _Declined(f"Content-Length {size}, wanted {length}")
    return keep


def _close_all(idle: list[socket.socket]) -> None:
    while idle:
        idle.pop().close()

"""A raw socket server on 127.0.0.1 that answers HTTP requests with canned bytes: for
tests of the HTTP clients (``keepalive``, ``trio_gets``) against the response shapes
servers send and the broken ones they must refuse."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Answer = Callable[[socket.socket, int], bool]  # (connection, request number) -> keep the connection


class CannedServer:
    """Accepts connections on 127.0.0.1; for each request read (up to a blank line), calls
    ``answer``. Counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    if b"\r\n\r\n" not in buf:
                        break
                    request, buf = buf.split(b"\r\n\r\n", 1)
                    self.requests.append(request)
                    if not self.answer(conn, len(self.requests)):
                        break

    def close(self) -> None:
        self.listener.close()


def send(data: bytes, keep: bool = True) -> Answer:
    """An answer that sends ``data`` to every request (and keeps the connection or not)."""
    def answer(conn: socket.socket, _n: int) -> bool:
        conn.sendall(data)
        return keep
    return answer


def trickle(head: bytes, body: bytes, every: float) -> Answer:
    """An answer that sends ``head`` at once, then ``body`` a byte every ``every``
    seconds; ends quietly when the client goes away."""
    def answer(conn: socket.socket, _n: int) -> bool:
        try:
            conn.sendall(head)
            for i in range(len(body)):
                time.sleep(every)
                conn.sendall(body[i:i + 1])
        except OSError:
            return False
        return True
    return answer


@contextmanager
def canned_servers() -> Iterator[Callable[[Answer], CannedServer]]:
    """Start servers with ``start(answer)``; all are closed at the end."""
    servers: list[CannedServer] = []

    def start(answer: Answer) -> CannedServer:
        servers.append(CannedServer(answer))
        return servers[-1]

    try:
        yield start
    finally:
        for server in servers:
            server.close()

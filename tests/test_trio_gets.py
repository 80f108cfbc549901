"""Ranged GETs on the trio loop against a raw socket server with canned answers: the
bytes of a 206 answer, keep-alive reuse, and a decline (None, never an exception or
wrong bytes) for every answer the fast path does not take, with the back-off after a
failure and the bound on connections."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from cafs.stores import trio_gets
from cafs.stores.trio_gets import TrioGets
from cannedhttp import Answer, CannedServer, canned_servers, send

Serve = Callable[..., tuple[CannedServer, TrioGets]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    with canned_servers() as start:
        def serve_one(answer: Answer, **options: float) -> tuple[CannedServer, TrioGets]:
            server = start(answer)
            return server, TrioGets("127.0.0.1", server.port, "/repo/", {"Authorization": "Bearer t"}, **options)
        yield serve_one


PARTIAL = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 10-14/99\r\n\r\nhello"


async def test_the_body_of_a_206_answer_on_one_kept_connection(serve: Serve) -> None:
    server, gets = serve(send(PARTIAL))
    for _ in range(3):
        got = await gets.get("packs/ab/cd", 10, 5)
        assert got is not None and bytes(got) == b"hello"
    assert server.connections == 1 and len(server.requests) == 3
    first = server.requests[0].decode()
    assert first.startswith("GET /repo/packs/ab/cd HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in first
    assert "Authorization: Bearer t\r\n" in first and "Range: bytes=10-14" in first


async def test_connection_close_or_http_1_0_opens_a_new_connection_next_time(serve: Serve) -> None:
    server, gets = serve(send(b"HTTP/1.0 206 Partial Content\r\nContent-Length: 5\r\n\r\nhello", keep=False))
    for _ in range(2):
        got = await gets.get("k", 0, 5)
        assert got is not None and bytes(got) == b"hello"
    assert server.connections == 2


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",  # the whole object: the threaded path
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\n\r\nhell",  # not the length asked
    b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nhel",  # closed in the body
    b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nhello, and more",
    b"HTTP/1.1 206 Partial Content\r\nno colon\r\nContent-Length: 5\r\n\r\nhello",
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 206 Partial Content\r\nX: " + b"a" * (20 << 10) + b"\r\n\r\n",
])
async def test_answers_the_fast_path_does_not_take_are_declined(serve: Serve, response: bytes) -> None:
    _server, gets = serve(send(response, keep=False))
    assert await gets.get("k", 0, 5) is None


async def test_a_stalled_server_is_declined_within_the_timeout(serve: Serve) -> None:
    _server, gets = serve(lambda conn, n: True, timeout=0.3)  # reads the request, never answers
    started = time.monotonic()
    assert await gets.get("k", 0, 5) is None
    assert time.monotonic() - started < 2


async def test_a_refused_connection_is_declined() -> None:
    gets = TrioGets("127.0.0.1", 9, "/", {})
    assert await gets.get("k", 0, 5) is None


async def test_after_a_failure_it_declines_without_asking_then_tries_again(
        serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trio_gets, "BACKOFF", 0.3)
    answers = [b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", PARTIAL]
    server, gets = serve(lambda conn, n: (conn.sendall(answers[min(n, 2) - 1]), False)[1])
    assert await gets.get("k", 10, 5) is None
    assert await gets.get("k", 10, 5) is None  # backing off: the server is not asked
    assert len(server.requests) == 1
    await trio.sleep(0.35)
    got = await gets.get("k", 10, 5)
    assert got is not None and bytes(got) == b"hello"


async def test_bytes_that_fail_verification_back_off_too(serve: Serve) -> None:
    server, gets = serve(send(PARTIAL))
    assert await gets.get("k", 10, 5) is not None
    gets.failed()  # what Repository.read_run_async does with bytes that do not verify
    assert await gets.get("k", 10, 5) is None
    assert len(server.requests) == 1


async def test_no_more_connections_than_allowed(serve: Serve) -> None:
    _server, gets = serve(lambda conn, n: True, connections=1, timeout=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gets.get, "k", 0, 5)
        await trio.sleep(0.2)  # the only connection waits on a server that does not answer
        started = time.monotonic()
        assert await gets.get("k", 0, 5) is None  # declined at once: no second connection
        assert time.monotonic() - started < 1
        nursery.cancel_scope.cancel()


async def test_a_host_name_is_looked_up_without_stalling_the_loop(serve: Serve, monkeypatch) -> None:
    """A slow resolver (1 s here) must not stall the loop that serves the mount's other
    requests: the name is looked up on a thread while other tasks run."""
    server, _ = serve(send(PARTIAL))
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def slow_resolver(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002 (socket's names)
        if not flags & socket.AI_NUMERICHOST:
            looked_up.append(host.decode() if isinstance(host, bytes) else host)
            time.sleep(1.0)
        return [info for info in real(host, port, family, type, proto, flags) if info[0] == socket.AF_INET]

    monkeypatch.setattr(socket, "getaddrinfo", slow_resolver)
    gets = TrioGets("localhost", server.port, "/repo/", {}, timeout=30)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tick)
        got = await gets.get("k", 10, 5)
        nursery.cancel_scope.cancel()
    assert got is not None and bytes(got) == b"hello"
    assert looked_up == ["localhost"]
    assert ticks >= 5  # the loop ran on while the name was looked up

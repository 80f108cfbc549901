"""The keep-alive GET client against a raw socket server that answers with canned bytes:
the response shapes servers send (Content-Length, chunked, HTTP/1.0 up to the close, an
interim 1xx), keep-alive reuse and reconnection, and broken responses, each of which
must be StoreUnavailable, never a hang or wrong bytes; closing a connection ends a read
stalled on it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from cafs.errors import StoreUnavailable
from cafs.stores import keepalive
from cafs.stores.keepalive import KeepAliveGets
from cannedhttp import Answer, CannedServer, canned_servers, send, trickle

@pytest.fixture
def serve() -> Iterator[Callable[[Answer], tuple[CannedServer, KeepAliveGets]]]:
    with canned_servers() as start:
        def serve_one(answer: Answer) -> tuple[CannedServer, KeepAliveGets]:
            server = start(answer)
            return server, KeepAliveGets(f"http://127.0.0.1:{server.port}", None, timeout=3)
        yield serve_one


def test_content_length_and_keep_alive_reuse(serve) -> None:
    server, gets = serve(send(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n"
                              b"Content-Range: bytes 0-4/10\r\n\r\nhello"))
    for _ in range(3):
        assert gets.get("/x", {"Range": "bytes=0-4"}, "x")[:2] == (206, b"hello")
    assert server.connections == 1 and len(server.requests) == 3
    first = server.requests[0].decode()
    assert first.startswith("GET /x HTTP/1.1\r\n") and f"Host: 127.0.0.1:{server.port}" in first
    assert "Range: bytes=0-4" in first


def test_chunked_body_with_extensions_and_trailers(serve) -> None:
    _server, gets = serve(send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"3;ext=1\r\nabc\r\n4\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n"))
    assert gets.get("/x", {}, "x")[:2] == (200, b"abcdefg")
    assert gets.get("/x", {}, "x")[:2] == (200, b"abcdefg")


def test_http_1_0_body_up_to_the_close(serve) -> None:
    server, gets = serve(send(b"HTTP/1.0 200 OK\r\n\r\nall of it", keep=False))
    assert gets.get("/x", {}, "x")[:2] == (200, b"all of it")
    assert gets.get("/x", {}, "x")[:2] == (200, b"all of it")
    assert server.connections == 2


def test_interim_response_then_the_real_one(serve) -> None:
    _server, gets = serve(send(b"HTTP/1.1 100 Continue\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    assert gets.get("/x", {}, "x")[:2] == (200, b"ok")


def test_interim_responses_without_end_are_a_broken_response(serve) -> None:
    """Each '100 Continue' arrives in time, so no timeout ever fired: the GET (and the
    command, or a mount's worker thread) went on for ever."""
    def flood(conn: socket.socket, _n: int) -> bool:
        try:
            while True:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 64)
        except OSError:
            return False
    _server, gets = serve(flood)
    with pytest.raises(StoreUnavailable, match="more than 8 interim"):
        gets.get("/x", {}, "x")


def test_connection_close_reconnects_for_the_next_request(serve) -> None:
    server, gets = serve(send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                              keep=False))
    assert gets.get("/x", {}, "x")[:2] == (200, b"ok")
    assert gets.get("/x", {}, "x")[:2] == (200, b"ok")
    assert server.connections == 2


def test_an_idle_connection_closed_by_the_server_is_retried_once(serve) -> None:
    def answer(conn: socket.socket, n: int) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        return False  # close after each response without saying so
    server, gets = serve(answer)
    assert gets.get("/x", {}, "x")[:2] == (200, b"ok")
    assert gets.get("/x", {}, "x")[:2] == (200, b"ok")  # the reused connection was closed: reopened
    assert server.connections == 2


@pytest.mark.parametrize("response, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "ended after 5 of 10"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "without a colon"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not hex"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", "over"),
    (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 300 + b"\r\n", "more than 200 header"),
])
def test_broken_responses_are_unavailable(serve, response: bytes, why: str) -> None:
    _server, gets = serve(send(response, keep=False))
    with pytest.raises(StoreUnavailable, match=why):
        gets.get("/x", {}, "x")


def test_a_body_over_the_limit_is_refused(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "MAX_BODY", 8)
    _server, gets = serve(send(b"HTTP/1.0 200 OK\r\n\r\n0123456789", keep=False))
    with pytest.raises(StoreUnavailable, match="over the limit"):
        gets.get("/x", {}, "x")


def test_a_stalled_server_times_out(serve) -> None:
    _server, gets = serve(lambda conn, n: True)  # reads the request, never answers
    gets._timeout = 0.5
    with pytest.raises(StoreUnavailable, match="timed out"):
        gets.get("/x", {}, "x")


def test_a_trickling_body_fails_within_the_timeout(serve) -> None:
    """A byte now and then keeps every socket wait short: the answer as a whole is
    bounded (its first bytes within the timeout, then cafs.stores.pace.MIN_RATE)."""
    _server, gets = serve(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n", b"x" * 400, 0.05))
    gets._timeout = 0.5
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="slower than"):
        gets.get("/x", {}, "x")
    assert time.monotonic() - started < 2


def test_a_refused_connection_is_unavailable() -> None:
    gets = KeepAliveGets("http://127.0.0.1:9", None, timeout=2)
    with pytest.raises(StoreUnavailable, match="GET failed"):
        gets.get("/x", {}, "x")


def test_closing_a_connection_ends_a_stalled_read_on_it_at_once(serve) -> None:
    """At interpreter exit (or collection) every connection is closed; one that a thread
    is still reading from, waiting on a stalled server, must not hold the close (and the
    exit of a mount daemon) until its timeout."""
    server, gets = serve(lambda conn, n: True)  # reads the request, never answers
    gets._timeout = 60
    failed: list[BaseException] = []

    def stalled_get() -> None:
        try:
            gets.get("/x", {}, "x")
        except (StoreUnavailable, ValueError) as exc:  # ValueError: closed before its read began
            failed.append(exc)
    reader = threading.Thread(target=stalled_get)
    reader.start()
    deadline = time.monotonic() + 10
    while not server.requests:
        assert time.monotonic() < deadline, "the GET never reached the server"
        time.sleep(0.01)
    t0 = time.monotonic()
    keepalive._close_all(gets._open)
    reader.join(timeout=10)
    assert time.monotonic() - t0 < 5, "closing waited for the stalled read"
    assert failed and not reader.is_alive()

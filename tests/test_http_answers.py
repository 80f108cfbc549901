"""The HTTP store against servers (and proxies, caches) that answer a ranged GET with
something else than the bytes asked for: another range, several ranges, a compressed
body, a body without end. Each must give exactly the bytes asked for, or a clear error;
never bytes from elsewhere, never memory without bound, and never a repository called
damaged for what its server did.

Raw answers come from ``tests/cannedhttp.py``; the end-to-end case serves a real
repository with a small ``http.server`` handler that answers every range wrongly.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cannedhttp import Answer, CannedServer, canned_servers, send
from fakehttp import FakeServer, QuietHandler
from mountfix import env, run_cafs
from treegen import make_tree

from cafs.errors import StoreError, StoreUnavailable
from cafs.stores import keepalive
from cafs.stores.http import HttpStore

SMALL = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "512K")
OBJECT = bytes(range(256)) * 4  # 1 KiB


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], CannedServer]]:
    with canned_servers() as start:
        yield start


def _store(server: CannedServer) -> HttpStore:
    return HttpStore(f"http://127.0.0.1:{server.port}/repo", timeout=5)


def _partial(first: int, last: int, body: bytes, *, total: int = len(OBJECT), extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\nContent-Range: bytes %d-%d/%d\r\n%s\r\n"
            % (len(body), first, last, total, extra) + body)


def test_a_partial_answer_of_another_range_is_refused(serve) -> None:
    """A cache that answers every range with the object's first bytes: the length is
    right, the bytes are not the ones asked for."""
    server = serve(send(_partial(0, 9, OBJECT[:10])))
    with pytest.raises(StoreUnavailable, match=r"asked for bytes 100-109, the server answered bytes 0-9/1024"):
        _store(server).get("packs/ab/one", 100, 10)


def test_a_partial_answer_without_content_range_is_refused(serve) -> None:
    server = serve(send(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n" + OBJECT[:10]))
    with pytest.raises(StoreUnavailable, match="206 with no Content-Range"):
        _store(server).get("packs/ab/one", 100, 10)


def test_several_ranges_where_one_was_asked_for_are_refused(serve) -> None:
    part = (b"--B\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 100-109/1024\r\n\r\n"
            + OBJECT[100:110] + b"\r\n--B--\r\n")
    server = serve(send(b"HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=B\r\n"
                        b"Content-Length: %d\r\n\r\n" % len(part) + part))
    with pytest.raises(StoreUnavailable, match="multipart/byteranges"):
        _store(server).get("packs/ab/one", 100, 10)


def test_a_partial_answer_that_runs_past_the_range_gives_the_bytes_asked_for(serve) -> None:
    """A server that sends from the offset asked to the end of the object."""
    server = serve(send(_partial(100, 1023, OBJECT[100:])))
    assert _store(server).get("packs/ab/one", 100, 10) == OBJECT[100:110]


def test_a_partial_answer_that_stops_short_of_the_object_s_end_is_refused(serve) -> None:
    server = serve(send(_partial(100, 104, OBJECT[100:105])))
    with pytest.raises(StoreUnavailable, match="answered only bytes 100-104/1024"):
        _store(server).get("packs/ab/one", 100, 10)


def test_an_object_shorter_than_the_range_is_still_truncated(serve) -> None:
    server = serve(send(_partial(100, 104, OBJECT[100:105], total=105)))
    with pytest.raises(StoreError, match="truncated") as info:
        _store(server).get("packs/ab/one", 100, 10)
    assert not isinstance(info.value, StoreUnavailable)


@pytest.mark.parametrize("status", [200, 206])
def test_a_compressed_body_is_refused_not_taken_for_the_object(serve, status: int) -> None:
    """A compressing proxy: gzip though the request accepted only identity."""
    body = gzip.compress(OBJECT if status == 200 else OBJECT[100:110])
    head = b"Content-Range: bytes 100-109/1024\r\n" if status == 206 else b""
    server = serve(send(b"HTTP/1.1 %d X\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n%s\r\n"
                        % (status, len(body), head) + body))
    with pytest.raises(StoreUnavailable, match="Content-Encoding 'gzip'"):
        _store(server).get("packs/ab/one", 100, 10)
    assert b"Accept-Encoding: identity" in server.requests[0]


LIMIT = 32 << 20  # a smaller MAX_BODY, so that the old code fails in a second, not after 4 GiB


class _Endless:
    """Answers 200 (no Content-Length) and sends bytes until the client goes away (or,
    so that a client without bounds does not take all memory, 2 * LIMIT bytes); counts
    what it sent."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, conn: socket.socket, _n: int) -> bool:
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            block = OBJECT * 64
            while self.sent < 2 * LIMIT:
                conn.sendall(block)
                self.sent += len(block)
        except OSError:
            pass
        return False


def test_a_ranged_read_takes_no_more_of_an_endless_body_than_it_needs(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that ignores Range and sends a body without end: a read of 10 bytes
    reads what it needs of it (here: the first 110 bytes) and hangs up, not MAX_BODY
    bytes (4 GiB held in memory before the error)."""
    monkeypatch.setattr(keepalive, "MAX_BODY", LIMIT)
    endless = _Endless()
    server = serve(endless)
    assert _store(server).get("packs/ab/one", 100, 10) == OBJECT[100:110]
    assert endless.sent < LIMIT // 2


def test_a_redirected_ranged_read_takes_no_more_of_an_endless_body_than_it_needs(serve) -> None:
    endless = _Endless()
    target = serve(endless)
    front = serve(send(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:%d/repo/packs/ab/one\r\n"
                       b"Content-Length: 0\r\n\r\n" % target.port, keep=False))
    assert _store(front).get("packs/ab/one", 100, 10) == OBJECT[100:110]
    assert endless.sent < LIMIT // 2


class _WrongRanges(QuietHandler):
    """Serves ``root``; answers a range with the object's bytes from 0 (of the length asked),
    as a broken cache in front of a server might."""

    root: Path

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
        if path.is_dir():
            names = [{"name": p.name, "type": "directory" if p.is_dir() else "file",
                      "size": p.stat().st_size} for p in path.iterdir()]
            self.answer(200, json.dumps(names).encode())
            return
        if not path.is_file():
            self.answer(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match is None:
            self.answer(200, data)
            return
        first = int(match[1])
        last = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        n = last - first + 1
        self.answer(206, data[:n], {"Content-Range": f"bytes 0-{n - 1}/{len(data)}"})


def test_fsck_behind_a_server_that_answers_other_ranges_blames_the_server(tmp_path: Path) -> None:
    """Every pack read through such a server came back as a truncated or corrupt pack
    (exit 4, damage a repair would act on); the repository is sound, its server is not:
    exit 8, one line naming the answer."""
    repo = tmp_path / "repo"
    cache = tmp_path / "cache"
    assert run_cafs("init", repo, *SMALL, cache=cache).returncode == 0
    r = run_cafs("import", make_tree(tmp_path / "src"), repo, "--name", "ds", "--no-progress", cache=cache)
    assert r.returncode == 0, r.stderr
    handler = type("Handler", (_WrongRanges,), {"root": tmp_path})
    server = FakeServer(handler)
    command = [sys.executable, "-m", "cafs.cli", "fsck", f"{server.url}/repo"]
    try:
        r = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                           env=env(CAFS_CACHE_DIR=str(tmp_path / "cache2"), CAFS_TIMEOUT="2"))
    finally:
        server.close()
    assert r.returncode == 8, r.stdout + r.stderr
    assert "the server answered bytes 0-" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert "truncated" not in r.stdout + r.stderr
    assert os.path.isdir(repo / "packs")

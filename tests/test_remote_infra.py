"""Self-tests of the remote-store test infrastructure: ``tests/nginx.py`` (a real nginx) and
``tests/faultproxy.py`` (faults between a client and that nginx), through the fixtures in
``tests/remote_fixtures.py``. Clients are urllib3 and raw sockets, never cafs code, so a
failure here is a fault of the infrastructure. Fast: a few seconds in all.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import urllib3
from faultproxy import FaultProxy
from nginx import NginxError, NginxServer
from remote_fixtures import StartNginx, StartProxy
from urllib3.exceptions import NewConnectionError, ProtocolError, ReadTimeoutError, SSLError

DATA = bytes(range(256)) * 1024  # 256 KiB, every byte value at every offset mod 256
TIMEOUT = urllib3.Timeout(connect=2.0, read=5.0)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "sub").mkdir(parents=True)
    (r / "data.bin").write_bytes(DATA)
    (r / "small.txt").write_bytes(b"hello, world\n")
    (r / "sub" / "a.txt").write_bytes(b"a" * 10)
    (r / ".hidden").write_bytes(b"h")
    return r


@contextmanager
def pool(url: str, **kw: object) -> Iterator[urllib3.HTTPConnectionPool]:
    """A one-connection pool with no retries, so every fault reaches the test."""
    p = urllib3.connection_from_url(url, maxsize=1, block=True, retries=False,
                                    timeout=kw.pop("timeout", TIMEOUT), **kw)
    try:
        yield p
    finally:
        p.close()


def get(p: urllib3.HTTPConnectionPool, path: str, **kw: object) -> urllib3.BaseHTTPResponse:
    return p.request("GET", path, **kw)  # type: ignore[arg-type]


# -- nginx -------------------------------------------------------------------------------


def test_range_get_returns_exact_bytes(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    with pool(srv.url) as p:
        r = get(p, "/data.bin", headers={"Range": "bytes=1000-70999"})
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 1000-70999/{len(DATA)}"
        assert r.data == DATA[1000:71000]
        r = get(p, "/data.bin", headers={"Range": f"bytes={len(DATA) - 5}-"})
        assert (r.status, r.data) == (206, DATA[-5:])
        assert get(p, "/data.bin", headers={"Range": f"bytes={len(DATA)}-"}).status == 416
        r = p.request("HEAD", "/data.bin")
        assert (r.status, r.headers["Content-Length"], r.data) == (200, str(len(DATA)), b"")
        assert get(p, "/missing").status == 404


def test_autoindex_lists_a_directory_as_json(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    with pool(srv.url) as p:
        listing = json.loads(get(p, "/").data)
        by_name = {e["name"]: e for e in listing}
        assert set(by_name) == {"data.bin", "small.txt", "sub"}  # no dot files
        assert by_name["data.bin"]["type"] == "file"
        assert by_name["data.bin"]["size"] == len(DATA)
        assert by_name["sub"]["type"] == "directory"
        assert "mtime" in by_name["sub"]
        assert [e["name"] for e in json.loads(get(p, "/sub/").data)] == ["a.txt"]
        r = get(p, "/sub", redirect=False)
        assert (r.status, r.headers["Location"]) == (301, "/sub/")  # relative


def test_dav_put_mkcol_move_delete(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    with pool(srv.url) as p:
        assert p.request("PUT", "/new/deep/f.bin", body=b"x" * 5000).status == 201
        assert (root / "new/deep/f.bin").read_bytes() == b"x" * 5000
        assert oct((root / "new/deep/f.bin").stat().st_mode & 0o777) == oct(0o644)
        assert p.request("PUT", "/new/deep/f.bin", body=b"y").status == 204
        assert p.request("PUT", "/empty", body=b"").status == 201
        assert (root / "empty").read_bytes() == b""
        assert p.request("MKCOL", "/col/").status == 201
        assert (root / "col").is_dir()
        assert p.request("MKCOL", "/col/").status == 405
        r = p.request("MOVE", "/new/deep/f.bin", headers={"Destination": "/col/g.bin"})
        assert r.status in (201, 204)
        assert not (root / "new/deep/f.bin").exists()
        assert (root / "col/g.bin").read_bytes() == b"y"
        r = p.request("MOVE", "/col/g.bin", headers={"Destination": f"{srv.url}/col/h.bin"})
        assert r.status in (201, 204)
        assert p.request("DELETE", "/col/h.bin").status == 204
        assert p.request("DELETE", "/col/h.bin").status == 404
        assert p.request("DELETE", "/col/").status == 204
        assert not (root / "col").exists()
        assert p.request("DELETE", "/").status == 409  # min_delete_depth
        assert (root / "small.txt").exists()


def test_move_with_overwrite_false_onto_an_existing_file_is_412(
        nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    with pool(srv.url) as p:
        assert p.request("PUT", "/tmp-1", body=b"new").status == 201
        r = p.request("MOVE", "/tmp-1", headers={"Destination": "/small.txt", "Overwrite": "F"})
        assert r.status == 412
        assert (root / "small.txt").read_bytes() == b"hello, world\n"
        assert (root / "tmp-1").read_bytes() == b"new"
        r = p.request("MOVE", "/tmp-1", headers={"Destination": "/d/fresh", "Overwrite": "F"})
        assert r.status in (201, 204)
        assert (root / "d/fresh").read_bytes() == b"new"
        r = p.request("MOVE", "/d/fresh", headers={"Destination": "/small.txt"})
        assert r.status == 204  # no Overwrite header: replaced
        assert (root / "small.txt").read_bytes() == b"new"


def test_put_ignores_if_none_match_star(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    with pool(srv.url) as p:
        r = p.request("PUT", "/small.txt", body=b"replaced", headers={"If-None-Match": "*"})
        assert r.status == 204  # not 412: nginx's dav module does not look at the header
        assert (root / "small.txt").read_bytes() == b"replaced"


def test_read_only_server_rejects_writes(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root, read_only=True)
    with pool(srv.url) as p:
        assert p.request("PUT", "/x", body=b"x").status == 405
        assert p.request("DELETE", "/small.txt").status == 405
        assert p.request("MKCOL", "/d/").status == 405
        assert get(p, "/small.txt").data == b"hello, world\n"
    assert not (root / "x").exists()


def test_tls_needs_the_ca(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root, tls=True)
    assert srv.url.startswith("https://127.0.0.1:")
    with pool(srv.url, ca_certs=str(srv.ca_file)) as p:
        assert get(p, "/small.txt").data == b"hello, world\n"
    with pool(srv.url) as p, pytest.raises(SSLError):
        get(p, "/small.txt")
    with pool(srv.url.replace("127.0.0.1", "localhost"), ca_certs=str(srv.ca_file)) as p:
        assert get(p, "/small.txt").status == 200


def test_mutual_tls_rejects_missing_and_foreign_client_certs(
        nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root, client_certs=True)
    ca = str(srv.ca_file)
    cert, key = map(str, srv.client_cert)
    with pool(srv.url, ca_certs=ca, cert_file=cert, key_file=key) as p:
        assert get(p, "/small.txt").data == b"hello, world\n"
    with pool(srv.url, ca_certs=ca) as p:
        assert get(p, "/small.txt").status == 400  # nginx: no required certificate
    bad_cert, bad_key = map(str, srv.bad_client_cert)
    with pool(srv.url, ca_certs=ca, cert_file=bad_cert, key_file=bad_key) as p:
        assert get(p, "/small.txt").status == 400  # nginx: certificate error


def test_basic_auth(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root, basic_auth=("alice", "s3cret pw"))
    with pool(srv.url) as p:
        ok = urllib3.make_headers(basic_auth="alice:s3cret pw")
        assert get(p, "/small.txt", headers=ok).status == 200
        assert p.request("PUT", "/w", body=b"w", headers=ok).status == 201
        assert get(p, "/small.txt").status == 401
        bad = urllib3.make_headers(basic_auth="alice:wrong")
        assert get(p, "/small.txt", headers=bad).status == 401
        assert p.request("PUT", "/w2", body=b"w").status == 401
    assert not (root / "w2").exists()


def test_bearer_token(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root, bearer_token="tok-123.abc")
    with pool(srv.url) as p:
        assert get(p, "/small.txt", headers={"Authorization": "Bearer tok-123.abc"}).status == 200
        assert get(p, "/small.txt", headers={"Authorization": "Bearer tok-124.abc"}).status == 401
        assert get(p, "/small.txt").status == 401
        assert p.request("PUT", "/w", body=b"w").status == 401
    assert not (root / "w").exists()


def test_restart_serves_again_on_the_same_port(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    port, pid = srv.port, srv.pid
    srv.stop()
    assert not srv.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((srv.host, port), timeout=2).close()
    srv.start()
    assert (srv.port, srv.running) == (port, True)
    assert srv.pid != pid
    with pool(srv.url) as p:
        assert get(p, "/small.txt").data == b"hello, world\n"
    srv.restart()
    with pool(srv.url) as p:
        assert get(p, "/small.txt").status == 200


def test_start_failure_reports_the_error_log(tmp_path: Path, root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        srv = NginxServer(root, tmp_path / "ngx", port=busy.getsockname()[1])
        try:
            with pytest.raises(NginxError, match="Address already in use"):
                srv.start()
        finally:
            srv.stop()
    assert not srv.running


# -- fault proxy -------------------------------------------------------------------------


@pytest.fixture
def proxied(nginx_server: StartNginx, fault_proxy: StartProxy,
            root: Path) -> tuple[NginxServer, FaultProxy]:
    srv = nginx_server(root)
    return srv, fault_proxy(srv)


def upstream_requests(srv: NginxServer) -> list[str]:
    """Request lines nginx logged (it writes one per request, unbuffered)."""
    return [line.split('"')[1] for line in srv.access_log.read_text().splitlines()]


def test_pass_is_transparent_and_keeps_connections_alive(
        proxied: tuple[NginxServer, FaultProxy]) -> None:
    srv, proxy = proxied
    with pool(proxy.url) as p:
        assert get(p, "/data.bin").data == DATA
        assert get(p, "/data.bin", headers={"Range": "bytes=10-19"}).data == DATA[10:20]
        assert p.request("HEAD", "/data.bin").headers["Content-Length"] == str(len(DATA))
        assert p.request("PUT", "/up/f", body=DATA).status == 201
        assert p.request("PUT", "/up/g", body=iter([b"chunked ", b"body"])).status == 201
        assert get(p, "/up/g").data == b"chunked body"
        listing = get(p, "/up/")  # nginx sends it chunked; the proxy de-chunks it
        assert sorted(e["name"] for e in json.loads(listing.data)) == ["f", "g"]
        assert get(p, "/up", redirect=False).headers["Location"] == "/up/"
        assert p.num_connections == 1
    assert proxy.counts()["/data.bin"] == 3
    assert proxy.faults_fired == 0
    assert len(upstream_requests(srv)) == 8


def test_refuse_then_pass_on_the_same_port(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    with pool(proxy.url) as p:
        assert get(p, "/small.txt").status == 200  # a pooled keep-alive connection
        proxy.set_mode("refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=2).close()
        with pytest.raises(NewConnectionError) as err:
            get(p, "/small.txt")  # the pooled connection was closed: a new one is refused
        assert isinstance(err.value.__cause__, ConnectionRefusedError)
        proxy.set_mode("pass")
        assert get(p, "/small.txt").data == b"hello, world\n"


def test_reset_mid_body(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("reset_mid_body", match=r"^/data\.bin$", at=100_000)
    with pool(proxy.url) as p:
        assert get(p, "/small.txt").status == 200  # out of scope
        r = get(p, "/data.bin", preload_content=False)
        assert (r.status, r.headers["Content-Length"]) == (200, str(len(DATA)))
        got = b""
        with pytest.raises(ProtocolError, match="Connection reset by peer"):
            while chunk := r.read(8192):
                got += chunk
        r.release_conn()
    assert DATA.startswith(got) and len(got) <= 100_000  # what got in before the RST
    assert proxy.faults_fired == 1


def test_stall_is_seen_as_a_read_timeout(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("stall", match="small")
    with pool(proxy.url, timeout=urllib3.Timeout(connect=2.0, read=0.3)) as p:
        assert get(p, "/sub/a.txt").status == 200
        with pytest.raises(ReadTimeoutError):
            get(p, "/small.txt")
        proxy.set_mode("pass")
        assert get(p, "/small.txt").data == b"hello, world\n"
    assert [s.fault for s in proxy.seen()] == [None, "stall", None]


def test_stall_for_seconds_then_answer(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("stall", seconds=0.2)
    with pool(proxy.url, timeout=urllib3.Timeout(connect=2.0, read=0.05)) as p, \
            pytest.raises(ReadTimeoutError):
        get(p, "/small.txt")
    with pool(proxy.url) as p:
        assert get(p, "/small.txt").data == b"hello, world\n"


def test_short_body(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("short_body", method="GET")
    with pool(proxy.url) as p:
        assert p.request("HEAD", "/data.bin").status == 200  # no body: passes
        r = get(p, "/data.bin", preload_content=False)
        assert r.headers["Content-Length"] == str(len(DATA))
        with pytest.raises(ProtocolError, match="IncompleteRead"):
            r.read()
        r.release_conn()
    assert proxy.faults_fired == 1


def test_flip_bytes_keeps_the_length(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("flip_bytes", ranged=True, at=3)
    with pool(proxy.url) as p:
        assert get(p, "/data.bin").data == DATA  # not ranged: passes
        r = get(p, "/data.bin", headers={"Range": "bytes=0-9"})
        assert r.status == 206
        assert len(r.data) == 10
        diff = [i for i in range(10) if r.data[i] != DATA[i]]
        assert diff == [3] and r.data[3] == DATA[3] ^ 0xFF
        assert get(p, "/small.txt").data == b"hello, world\n"  # same connection still good
    assert proxy.faults_fired == 1


def test_status_on_matching_paths_only(proxied: tuple[NginxServer, FaultProxy]) -> None:
    srv, proxy = proxied
    with pool(proxy.url) as p:
        proxy.set_mode("status", match=r"^/sub/", status=404)
        assert get(p, "/sub/a.txt").status == 404
        assert get(p, "/small.txt").status == 200
        proxy.set_mode("status", match=r"\.bin$", status=500)
        r = get(p, "/data.bin")
        assert (r.status, r.headers["X-Fault-Proxy"]) == (500, "status")
        assert get(p, "/sub/a.txt").data == b"a" * 10
        assert p.num_connections == 1
    assert upstream_requests(srv) == ["GET /small.txt HTTP/1.1", "GET /sub/a.txt HTTP/1.1"]
    assert proxy.counts() == {"/sub/a.txt": 2, "/small.txt": 1, "/data.bin": 1}


def test_times_limits_a_fault(proxied: tuple[NginxServer, FaultProxy]) -> None:
    _, proxy = proxied
    proxy.set_mode("status", status=503, times=2)
    with pool(proxy.url) as p:
        assert [get(p, "/small.txt").status for _ in range(3)] == [503, 503, 200]
    assert proxy.mode == "status" and proxy.faults_fired == 2


def test_upstream_down_resets_then_recovers(proxied: tuple[NginxServer, FaultProxy]) -> None:
    srv, proxy = proxied
    with pool(proxy.url) as p:
        assert get(p, "/small.txt").status == 200
        srv.stop()
        with pytest.raises(ProtocolError):
            get(p, "/small.txt")
        srv.start()
        assert get(p, "/small.txt").data == b"hello, world\n"


def test_stop_ends_stalled_and_idle_connections(nginx_server: StartNginx, root: Path) -> None:
    srv = nginx_server(root)
    proxy = FaultProxy(srv.url).start()
    try:
        idle = socket.create_connection((proxy.host, proxy.port))
        stalled = socket.create_connection((proxy.host, proxy.port))
        proxy.set_mode("stall")
        stalled.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        stalled.settimeout(0.2)
        with pytest.raises(TimeoutError):
            stalled.recv(1)
        stalled.settimeout(5)
    finally:
        proxy.stop()
    try:
        assert stalled.recv(1) == b""
        idle.settimeout(5)
        assert idle.recv(1) == b""
    finally:
        idle.close()
        stalled.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("faultproxy-")]

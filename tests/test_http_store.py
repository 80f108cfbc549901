"""The HTTP(S) store against a real nginx (and Python's own static server): the store
contract, the command line end to end, credentials and TLS.

Every server is started by a fixture on 127.0.0.1 and stopped by PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cannedhttp import canned_servers, trickle
from fakehttp import FakeServer, QuietHandler
from mountfix import env, import_tree, make_repo, mounted, run_cafs
from nginx import free_port
from treegen import all_files, assert_same_tree, make_tree

from cafs.errors import ObjectNotFound, StoreError, StoreUnavailable, UsageError
from cafs.stores import ObjectExists, open_store
from cafs.stores.access import RemoteAccess, access_for
from cafs.stores.http import HttpStore

SMALL = ("--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "512K")


def test_store_contract(nginx_server) -> None:
    server = nginx_server()
    store = HttpStore(server.url + "/repo")
    with pytest.raises(ObjectNotFound):
        store.get("packs/00/nope")
    data = os.urandom(100_000)
    store.put("packs/ab/one", data)
    assert store.get("packs/ab/one") == data
    assert store.get("packs/ab/one", 99_990, 10) == data[99_990:]
    assert store.get("packs/ab/one", 5, 0) == b""
    with pytest.raises(StoreError, match="truncated"):
        store.get("packs/ab/one", 99_995, 10)
    store.put("packs/ab/one", b"replaced")
    assert store.get("packs/ab/one") == b"replaced"
    store.put("refs/x/1", b"first", exclusive=True)
    with pytest.raises(ObjectExists):
        store.put("refs/x/1", b"second", exclusive=True)
    assert store.get("refs/x/1") == b"first"
    assert sorted(store.list("")) == [("packs/ab/one", 8), ("refs/x/1", 5)]
    assert list(store.list("refs/")) == [("refs/x/1", 5)]
    assert list(store.list("nothing/")) == []
    assert not [p for p in (server.root / "repo" / "refs" / "x").iterdir() if p.name.startswith(".")]
    store.delete("packs/ab/one")
    store.delete("packs/ab/one")
    with pytest.raises(ObjectNotFound):
        store.get("packs/ab/one")


def test_read_only_server_refuses_writes_clearly(nginx_server) -> None:
    server = nginx_server(read_only=True)
    with pytest.raises(StoreError, match="does not accept writes"):
        HttpStore(server.url).put("config", b"x")


def test_a_write_a_server_forbids_says_the_server_refuses_writes(nginx_server, tmp_path: Path) -> None:
    """A site that serves GET but answers 403 to every write (``limit_except GET HEAD {
    deny all; }``): reads pass with the same credentials, so the error must not send the
    user to check them; the import fails before writing anything."""
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"data\n")
    import_tree(src, make_repo(root / "repo", tmp_path / "cache"), "ds", tmp_path / "cache")
    before = all_files(root)
    url = nginx_server(root, deny_writes=True).url + "/repo"
    r = run_cafs("import", src, url, "--name", "ds", "--no-progress", cache=tmp_path / "cache")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and url in r.stderr, r.stderr
    assert "refuses writes here (403)" in r.stderr and "read-only" in r.stderr, r.stderr
    assert "check the credentials" not in r.stderr
    assert run_cafs("cat", f"{url}#ds:a", cache=tmp_path / "cache").stdout == "data\n"
    assert all_files(root) == before


def test_init_where_a_web_page_answers_for_config_names_it(nginx_server, tmp_path: Path) -> None:
    """A server that answers any path with a page (a login portal, a site's fallback)
    holds no repository: init says its config is not one, not that one exists."""
    server = nginx_server(read_only=True)
    (server.root / "repo").mkdir()
    (server.root / "repo" / "config").write_text("<html><body>Please log in</body></html>\n")
    r = run_cafs("init", server.url + "/repo", cache=tmp_path / "cache")
    assert r.returncode == 1
    assert "repo/config: not a cafs repository config" in r.stderr and "exists there already" not in r.stderr


def test_unreachable_server_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="127.0.0.1:9"):
        HttpStore("http://127.0.0.1:9/repo", timeout=2).get("config")


def test_import_get_fsck_over_http(nginx_server, tmp_path: Path) -> None:
    server = nginx_server()
    url = server.url + "/repo"
    src = make_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    for args in (("init", url, *SMALL), ("import", src, url, "--name", "ds", "--no-progress"),
                 ("get", f"{url}#ds", tmp_path / "out"), ("fsck", url, "--read-data")):
        r = run_cafs(*args, cache=cache)
        assert r.returncode == 0, f"cafs {args}: {r.stdout}{r.stderr}"
    assert_same_tree(src, tmp_path / "out")
    r = run_cafs("snapshots", url, cache=cache)
    assert "ds" in r.stdout
    r = run_cafs("import", src, url, "--name", "ds", "--no-progress", cache=cache)
    assert r.returncode == 0 and "jid" not in r.stderr
    assert run_cafs("ls", f"{url}#ds@2", cache=cache).returncode == 0


def test_a_path_with_spaces_and_non_ascii_names_one_directory(nginx_server, tmp_path: Path) -> None:
    """``http://host/données/my repo`` and its percent-encoded spelling name the same
    directory on the server, for reads, writes and exclusive writes (MOVE) alike."""
    server = nginx_server()
    raw, encoded = server.url + "/données/my repo", server.url + "/donn%C3%A9es/my%20repo"
    src = make_tree(tmp_path / "src", big_file_size=300_000)
    cache = tmp_path / "cache"
    for args in (("init", raw, *SMALL), ("import", src, raw, "--name", "ds", "--no-progress"),
                 ("get", f"{encoded}#ds", tmp_path / "out")):
        r = run_cafs(*args, cache=cache)
        assert r.returncode == 0, f"cafs {args}: {r.stdout}{r.stderr}"
    assert_same_tree(src, tmp_path / "out")
    assert [p.name for p in server.root.iterdir()] == ["données"]
    assert [p.name for p in (server.root / "données").iterdir()] == ["my repo"]


@pytest.mark.parametrize("url", ["http://h/repo?token=x", "https://h/repo?", "http://h/repo#ds"])
def test_a_query_or_fragment_in_a_store_url_is_refused(url: str) -> None:
    with pytest.raises(UsageError, match="takes no query or fragment") as raised:
        open_store(url)
    assert "token" not in str(raised.value)


def test_any_static_server_serves_reads(tmp_path: Path) -> None:
    """Python's http.server: HTML listings, no Range support, no writes."""
    repo = tmp_path / "repo"
    src = make_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    assert run_cafs("init", repo, *SMALL, cache=cache).returncode == 0
    assert run_cafs("import", src, repo, "--name", "ds", "--no-progress", cache=cache).returncode == 0
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port),
                             "-d", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/repo"
        _wait_listening(port)
        r = run_cafs("get", f"{url}#ds", tmp_path / "out", cache=tmp_path / "cache2")
        assert r.returncode == 0, r.stderr
        assert_same_tree(src, tmp_path / "out")
        r = run_cafs("fsck", url, cache=tmp_path / "cache2")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_a_trickling_server_fails_a_command_within_its_timeout(tmp_path: Path) -> None:
    """A server that sends a byte now and then: each socket wait is short, yet the
    command must end within CAFS_TIMEOUT (plus one request), with one clear line."""
    with canned_servers() as start:
        server = start(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n", b"[" * 400, 0.05))
        url = f"http://127.0.0.1:{server.port}/repo"
        with pytest.raises(StoreUnavailable, match="slower than"):
            list(HttpStore(url, timeout=0.5).list(""))  # urllib3's requests, as the GETs
        started = time.monotonic()
        r = _cafs(["ls", f"{url}#ds"], tmp_path / "cache", {"CAFS_TIMEOUT": "2"})
        elapsed = time.monotonic() - started
    assert r.returncode == 1 and "slower than" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert elapsed < 10


def test_an_upload_slower_than_the_timeout_is_not_a_timeout() -> None:
    """The pace of an answer starts at its head: a pack that takes longer than the
    timeout to upload over a slow link, steadily, is stored, not reported as timed out."""
    class SlowReader(QuietHandler):
        def do_PUT(self) -> None:  # slowly, then the last 12 MiB at once: more than the socket
            left = int(self.headers["Content-Length"])  # buffers hold, so the answer comes as the upload ends
            while left > 12 << 20:
                left -= len(self.rfile.read(1 << 20))
                time.sleep(0.2)
            self.rfile.read(left)
            self.answer(201)

    server = FakeServer(SlowReader)
    try:
        started = time.monotonic()  # a 4 s upload, in pieces that each take 0.2 s
        HttpStore(server.url + "/repo", timeout=2.0).put("packs/ab/one", bytes(32 << 20))
        assert time.monotonic() - started > 2.0
    finally:
        server.close()


def test_credentials_never_in_urls() -> None:
    with pytest.raises(UsageError, match="credentials in a URL") as info:
        open_store("https://alice:s3cret@example.com/repo")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("url", ["ftp://alice:s3cret@h/repo", "webdav://alice:s3cret@h/repo",
                                 "file://alice:s3cret@/srv/repo", "s3://bucket/repo?X-Amz-Signature=s3cret",
                                 "s3://bucket/repo#s3cret"])
def test_no_url_refused_for_another_reason_shows_its_secret(url: str) -> None:
    """An unknown scheme, a file:// URL with a host part, an s3:// URL with a query (a
    presigned URL's signature): the message names the URL, without what may be a secret."""
    with pytest.raises(UsageError) as info:
        open_store(url)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("url", ["https://h.example.org/repo", "https://h:4430/repo", "https://h/data2/repo",
                                 "https://h/database"])
def test_a_remote_is_for_its_own_host_port_and_path_only(tmp_path: Path, url: str) -> None:
    """``url = "https://h/data"`` gives its token to https://h/data and below, never to
    another host or port whose name starts the same, nor to a neighbouring path."""
    remotes = tmp_path / "remotes.toml"
    remotes.write_text('[[remote]]\nurl = "https://h/data"\ntoken = "tok-h-1"\n'
                       '[[remote]]\nurl = "https://h"\ntoken = "tok-h-2"\n')
    assert access_for("https://h/data/repo", {"CAFS_REMOTES": str(remotes)}).token == "tok-h-1"
    assert access_for("https://h/data", {"CAFS_REMOTES": str(remotes)}).token == "tok-h-1"
    expected = "tok-h-2" if url.startswith("https://h/") else None
    assert access_for(url, {"CAFS_REMOTES": str(remotes)}).token == expected


def test_remotes_file_longest_prefix_and_env_override(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok-from-file\n")
    remotes = tmp_path / "remotes.toml"
    remotes.write_text(
        '[[remote]]\nurl = "https://h/"\nusername = "u"\npassword = "p"\n'
        f'[[remote]]\nurl = "https://h/data"\ntoken_file = "{token}"\nca_file = "/ca.pem"\n')
    access = access_for("https://h/data/repo", {"CAFS_REMOTES": str(remotes)})
    assert access == RemoteAccess(token="tok-from-file", ca_file="/ca.pem")
    assert "tok-from-file" not in repr(access)
    other = access_for("https://h/other", {"CAFS_REMOTES": str(remotes), "CAFS_PASSWORD": "q"})
    assert (other.username, other.password) == ("u", "q")
    remotes.write_text('[[remote]]\nurl = "https://h/"\nbogus = "x"\n')
    with pytest.raises(UsageError, match="unknown setting 'bogus'"):
        access_for("https://h/x", {"CAFS_REMOTES": str(remotes)})


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_authenticated_server(nginx_server, tmp_path: Path, auth: str) -> None:
    if auth == "basic":
        server = nginx_server(basic_auth=("alice", "pw-basic-9"))
        good = {"CAFS_USERNAME": "alice", "CAFS_PASSWORD": "pw-basic-9"}
        bad = {"CAFS_USERNAME": "alice", "CAFS_PASSWORD": "wrong-pw-1"}
    else:
        server = nginx_server(bearer_token="tok-bearer-7")
        good = {"CAFS_TOKEN": "tok-bearer-7"}
        bad = {"CAFS_TOKEN": "wrong-token-2"}
    url = server.url + "/repo"
    cache = tmp_path / "cache"
    r = _cafs(["init", url], cache, good)
    assert r.returncode == 0, r.stderr
    r = _cafs(["snapshots", url], cache, bad)
    assert r.returncode != 0
    assert "access denied" in r.stderr and "401" in r.stderr
    for secret in (*good.values(), *bad.values()):
        if secret != "alice":
            assert secret not in r.stderr + r.stdout


def test_tls_and_client_certificates(nginx_server, tmp_path: Path) -> None:
    server = nginx_server(tls=True, client_certs=True)
    url = server.url + "/repo"
    cache = tmp_path / "cache"
    cert, key = server.client_cert
    good = {"CAFS_CA_FILE": str(server.ca_file), "CAFS_CERT_FILE": str(cert), "CAFS_KEY_FILE": str(key)}
    r = _cafs(["init", url], cache, good)
    assert r.returncode == 0, r.stderr
    r = _cafs(["snapshots", url], cache, {})
    assert r.returncode != 0 and "TLS failed" in r.stderr and "certificate" in r.stderr
    bad_cert, bad_key = server.bad_client_cert
    r = _cafs(["snapshots", url], cache, {**good, "CAFS_CERT_FILE": str(bad_cert), "CAFS_KEY_FILE": str(bad_key)})
    assert r.returncode != 0, r.stdout
    r = _cafs(["snapshots", url], cache, {k: v for k, v in good.items() if k == "CAFS_CA_FILE"})
    assert r.returncode != 0, r.stdout
    r = _cafs(["snapshots", url], cache, {**good, "CAFS_CA_FILE": str(tmp_path / "no-such-ca.pem")})
    assert r.returncode == 2 and "no-such-ca.pem" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cafs(["snapshots", url], cache, {**good, "CAFS_CERT_FILE": str(server.ca_file), "CAFS_KEY_FILE": str(cert)})
    assert r.returncode == 2 and "client certificate" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _cafs(args: list[str], cache: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in env(CAFS_CACHE_DIR=str(cache), CAFS_REMOTES="/nonexistent").items()
             if not k.startswith("CAFS_") or k in ("CAFS_CACHE_DIR", "CAFS_REMOTES")}
    return subprocess.run([sys.executable, "-m", "cafs.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**clean, **extra}, check=False)


def _wait_listening(port: int) -> None:
    import socket
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_server_without_listings_serves_named_snapshots(nginx_server, tmp_path: Path) -> None:
    """nginx without autoindex: REPO#NAME (via refs/NAME/latest) and REPO#NAME@JID work;
    what needs a listing fails with an error that says so."""
    repo = tmp_path / "www" / "repo"
    cache = tmp_path / "cache"
    src = make_tree(tmp_path / "src")
    assert run_cafs("init", repo, *SMALL, cache=cache).returncode == 0
    for _ in range(2):
        assert run_cafs("import", src, repo, "--name", "ds", "--no-progress", cache=cache).returncode == 0
    (repo / "refs" / "ds" / "latest").write_text(f"{1:020d}\n")  # lagging behind a commit
    server = nginx_server(tmp_path / "www", listing=False)
    url = server.url + "/repo"
    other = tmp_path / "cache2"
    r = run_cafs("get", f"{url}#ds", tmp_path / "out", cache=other)
    assert r.returncode == 0, r.stderr
    assert_same_tree(src, tmp_path / "out")
    r = run_cafs("ls", f"{url}#ds@1", cache=other)
    assert r.returncode == 0, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(f"{url}#ds", mnt, f"cache={tmp_path / 'cache3'}"):
        assert_same_tree(src, mnt)
        assert os.getxattr(mnt, "user.cafs.snapshot") == b"ds@2"
    r = run_cafs("snapshots", url, cache=other)
    assert r.returncode != 0 and "no directory listing" in r.stderr, r.stderr
    r = run_cafs("ls", f"{url}#nope", cache=other)
    assert r.returncode != 0 and "nope" in r.stderr
    (repo / "refs" / "ds" / "latest").unlink()
    r = run_cafs("ls", f"{url}#ds", cache=other)
    assert r.returncode != 0 and "ds" in r.stderr


def test_without_listings_older_snapshots_are_not_taken_for_gone(cafs, nginx_server, tmp_path: Path) -> None:
    """A server without listings shows a ref's newest snapshots only (through
    refs/NAME/latest): snapshots and forget of that ref say a listing is needed instead
    of answering for the whole journal (only the newest; 'forgot 0'; 'has no snapshot 1')."""
    repo = tmp_path / "www" / "repo"
    src = make_tree(tmp_path / "src")
    assert cafs("init", repo, *SMALL).code == 0
    for _ in range(2):
        assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    url = nginx_server(tmp_path / "www", listing=False).url + "/repo"
    for args in (("snapshots", url, "ds"), ("snapshots", url, "ds", "--json"),
                 ("forget", url, "ds", "--keep-last", "1"), ("forget", url, "ds", "--jid", "1")):
        r = cafs(*args)
        assert r.code == 1 and "no directory listing" in r.err and "Traceback" not in r.err, (args, r.out, r.err)
        assert r.out == "", (args, r.out)
    assert sorted(p.name for p in (repo / "refs" / "ds").iterdir()) == [f"{1:020d}", f"{2:020d}", "latest"]
    r = cafs("ls", f"{url}#ds")  # what needs the newest only still works
    assert r.code == 0, r.err


def test_a_lagging_mirror_does_not_name_the_newest_snapshot(cafs, nginx_server, tmp_path: Path) -> None:
    """A server without listings and a mirror that lags behind it (it lacks the newest
    snapshot): REPO#NAME is still the repository's newest. The mirror's listing was taken
    for the repository's, so adding --mirror turned REPO#ds into ds@1, with a warning that
    the repository 'failed'."""
    repo, mirror = tmp_path / "www" / "repo", tmp_path / "mirror"
    src = make_tree(tmp_path / "src")
    assert cafs("init", repo, *SMALL).code == 0
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    assert cafs("copy", f"{repo}#ds", mirror, "--no-progress").code == 0
    (src / "only-in-2").write_bytes(b"new")
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    url = nginx_server(tmp_path / "www", listing=False).url + "/repo"
    r = cafs("ls", f"{url}#ds", "--mirror", mirror)
    assert r.code == 0 and "only-in-2" in r.out, r.out + r.err
    assert "failed" not in r.err, r.err


def test_without_listings_a_mirror_that_is_down_is_not_waited_for(cafs, nginx_server, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """REPO#NAME on a server without listings looks for the entries after refs/NAME/latest
    until one is missing. Where the journal ends the repository says: the probe of the
    jid after the newest waited out the deadline for a mirror that is down, and failed
    with the mirror's 'Connection refused'."""
    monkeypatch.setenv("CAFS_TIMEOUT", "5")  # the old code failed after this
    repo = tmp_path / "www" / "repo"
    src = make_tree(tmp_path / "src")
    assert cafs("init", repo, *SMALL).code == 0
    assert cafs("import", src, repo, "--name", "ds", "--no-progress").code == 0
    url = nginx_server(tmp_path / "www", listing=False).url + "/repo"
    with socket.socket() as refusing:  # bound, never listening: connections are refused
        refusing.bind(("127.0.0.1", 0))
        r = cafs("ls", f"{url}#ds:data", "--mirror", f"http://127.0.0.1:{refusing.getsockname()[1]}/mirror")
    assert r.code == 0 and "big" in r.out, r.out + r.err


class _Redirector:
    """An HTTP server on 127.0.0.1 that answers every request with ``status`` and a
    ``Location`` on ``target`` (same path and query), ``hops`` times through itself
    first; records the Authorization headers it saw."""

    def __init__(self, target: str, status: int = 302, hops: int = 0) -> None:
        outer = self
        self.seen_auth: list[str | None] = []

        class Handler(QuietHandler):
            def _redirect(self) -> None:
                outer.seen_auth.append(self.headers.get("Authorization"))
                path, _, hop = self.path.partition("?hop=")
                n = int(hop or 0)
                where = (f"{outer.url}{path}?hop={n + 1}" if n < hops else f"{target}{path}")
                self.answer(status, headers={"Location": where})

            do_GET = do_HEAD = do_PUT = _redirect

        self._http = FakeServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()


def test_reads_follow_redirects_and_leave_credentials_behind(nginx_server, tmp_path: Path) -> None:
    server = nginx_server()
    src = make_tree(tmp_path / "src")
    cache = tmp_path / "cache"
    assert run_cafs("init", server.url + "/repo", *SMALL, cache=cache).returncode == 0
    r = run_cafs("import", src, server.url + "/repo", "--name", "ds", "--no-progress", cache=cache)
    assert r.returncode == 0, r.stderr
    front = _Redirector(server.url, status=307, hops=2)
    try:
        url = front.url + "/repo"
        r = _cafs(["get", f"{url}#ds", str(tmp_path / "out")], tmp_path / "cache2", {"CAFS_TOKEN": "tok-front-3"})
        assert r.returncode == 0, r.stderr
        assert_same_tree(src, tmp_path / "out")
        assert front.seen_auth and set(front.seen_auth) == {"Bearer tok-front-3"}
        r = _cafs(["import", str(src), url, "--name", "ds2", "--no-progress"], tmp_path / "cache3", {})
        # the redirect's own status (matched where the message puts it: the message also
        # names a random lock key, whose hex digits once held "302")
        assert r.returncode != 0 and "unexpected answer 307" in r.stderr, r.stderr
    finally:
        front.close()
    # credentials stay with the host they are for: a server behind the redirect that
    # wants the same token does not get it
    guarded = nginx_server(bearer_token="tok-front-3")
    front = _Redirector(guarded.url)
    try:
        r = _cafs(["snapshots", front.url + "/repo"], tmp_path / "cache4", {"CAFS_TOKEN": "tok-front-3"})
        assert r.returncode != 0 and "access denied" in r.stderr and "401" in r.stderr, r.stderr
        assert "tok-front-3" not in r.stderr
    finally:
        front.close()
    loop = _Redirector("http://127.0.0.1:1", hops=100)
    try:
        store = HttpStore(loop.url + "/repo", RemoteAccess(), timeout=5)
        with pytest.raises(StoreError, match="more than 5 redirects"):
            store.get("config")
    finally:
        loop.close()

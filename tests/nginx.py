"""A real nginx on 127.0.0.1 for remote-store tests: one child process per server.

Contract:

- ``NginxServer(root, tmp, ...)`` prepares a private nginx instance under ``tmp`` (prefix,
  ``nginx.conf``, pid file, ``error.log``, ``access.log``, temp dirs, certificates) that
  serves ``root``. Nothing runs until ``start()`` (or ``with NginxServer(...) as srv:``).
  ``start()`` launches ``/usr/sbin/nginx -p PREFIX -c CONF -e ERROR_LOG -g 'daemon off;
  master_process on;'`` under ``subprocess.Popen`` in its own session, and returns once
  nginx has written its pid file (it does so after binding its port, so a stranger on the
  port is not mistaken for it) and the port accepts connections; if nginx exits first, or
  is not ready within ``START_DEADLINE``, it raises ``NginxError`` with the error log in
  the message (e.g. ``bind() ... failed (98: Address already in use)``).
- ``stop()`` sends SIGTERM to the master's PID and waits; after ``STOP_DEADLINE`` it sends
  SIGKILL to the process group the master leads (its own workers, nothing else) and waits
  again. Idempotent. ``restart()`` is ``stop()`` then ``start()`` on the same port (for
  "the server goes away and comes back" tests). A free port is picked once, at the first
  ``start()``, unless ``port=`` is given.
- Properties: ``url`` (``http(s)://127.0.0.1:PORT``, no trailing slash), ``host``,
  ``port``, ``pid``, ``running``, ``root``, ``error_log``, ``access_log``; with TLS
  ``ca_file``; with ``client_certs`` ``client_cert`` and ``bad_client_cert``, each a
  ``(cert_file, key_file)`` pair (the bad one is signed by a different CA).

What the server does:

- ``GET``/``HEAD`` of files with ``Range`` support (206, and 416 past the end), always with
  ``Content-Length``. A directory URL ending in ``/`` answers an autoindex JSON listing:
  ``[{"name", "type": "file"|"directory"|..., "mtime": RFC 1123 date, "size" (files)}]``,
  sent with chunked transfer encoding. Without the trailing ``/`` a directory answers 301
  with a relative ``Location`` (``absolute_redirect off``, so redirects keep going
  through a proxy). Names starting with ``.`` are NOT listed by autoindex (but served).
- WebDAV writes (unless ``read_only``): ``PUT`` (201 created, 204 replaced; missing
  parent directories are created, unless ``full_put_path=False``: then 409; a body over
  ``max_body``, nginx's ``client_max_body_size`` (default ``"0"``: no limit), answers
  413; the body goes to a temp file under ``tmp`` and is renamed into place, so a reader never sees half a file; were ``tmp`` and ``root`` on
  different filesystems nginx would copy to ``NAME.0000000001`` beside the target first,
  visible in listings), ``DELETE`` (a directory needs a trailing ``/``; deleting ``/`` is
  refused with 409, ``min_delete_depth 1``), ``MKCOL`` (trailing ``/`` required; 405 if
  it exists), ``COPY`` and ``MOVE`` (``Destination`` may be a path like ``/a/b`` or an
  absolute URL whose host matches the request's ``Host``). New files get mode 0644.
  ``read_only=True`` leaves the dav module off: ``PUT``/``DELETE``/``MKCOL``/``MOVE``
  answer 405. ``deny_writes=True`` (implies ``read_only``) answers them 403 instead, as a
  site with ``limit_except GET HEAD { deny all; }`` does.
- ``tls=True``: HTTPS with a server certificate for ``IP:127.0.0.1`` and ``DNS:localhost``
  signed by a throw-away CA made with the ``openssl`` command (``ca_file``).
  ``client_certs=True`` (implies TLS): ``ssl_verify_client on`` against that CA. nginx
  finishes the handshake either way and answers **400** to a client with no certificate
  or with one it cannot verify.
- ``basic_auth=(user, password)``: ``auth_basic`` with an ``openssl passwd -apr1``
  htpasswd file; ``bearer_token="t"``: anything but ``Authorization: Bearer t`` gets 401
  (no ``WWW-Authenticate`` header). The two are mutually exclusive (``ValueError``).

Answers the store author asked for (nginx 1.22.1, measured by ``test_remote_infra.py``):

- ``MOVE`` with ``Overwrite: F`` onto an existing destination IS honoured: 412
  Precondition Failed, both files left as they were; onto a free name it moves (201/204,
  creating missing parent directories). Without the header nginx replaces the
  destination (204). How: ``ngx_http_dav_copy_move_handler`` does ``lstat(dest)`` and, if
  absent, ``rename(2)``: check-then-act, not ``RENAME_NOREPLACE``. Within one worker
  process both steps run without yielding, so on this server (``worker_processes 1``)
  "PUT a unique temp name, then MOVE it with ``Overwrite: F``" is an exclusive create;
  on an nginx with several workers two racing MOVEs to one name can both succeed (the
  later rename wins). A temp name starting with ``.`` stays out of autoindex listings.
- ``PUT`` with ``If-None-Match: *`` is NOT honoured: the dav module ignores the header and
  overwrites an existing file (204). Do not rely on it for exclusive puts.

Caveats:

- Runs workers as root when the tests run as root (``user root root;``), because pytest's
  tmp dirs are 0700 and workers would otherwise drop to ``nobody``; as non-root the
  ``user`` line is left out and everything runs as the caller.
- A free port is found by binding port 0 and closing it; another process could take it in
  between. ``start()`` then fails with a clear ``NginxError`` (it does not retry).
- Only for tests: certificates live two days; no rate limits, no timeouts tuned.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self

NGINX = "/usr/sbin/nginx"
OPENSSL = "openssl"
HOST = "127.0.0.1"
START_DEADLINE = 10.0  # seconds for nginx to accept connections
STOP_DEADLINE = 5.0  # seconds after SIGTERM before SIGKILL
POLL = 0.01
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/=-]+")


class NginxError(RuntimeError):
    """nginx could not be configured, started, or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _run(*args: str, cwd: Path, stdin: str | None = None) -> str:
    proc = subprocess.run(list(args), cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        raise NginxError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


_CA_CONF = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = {cn}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
{san}
"""


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    conf = d / f"{name}.cnf"
    conf.write_text(_CA_CONF.format(cn=f"cafs test {name}"))
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _run(OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-config", str(conf), "-keyout", str(key), "-out", str(crt),
         cwd=d)
    return crt, key


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], *, server: bool) -> tuple[Path, Path]:
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    ext = d / f"{name}.ext"
    ext.write_text(_LEAF_EXT.format(
        usage="serverAuth" if server else "clientAuth",
        san="subjectAltName = IP:127.0.0.1, DNS:localhost" if server else ""))
    _run(OPENSSL, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN={'localhost' if server else name}", "-keyout", str(key),
         "-out", str(csr), cwd=d)
    _run(OPENSSL, "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
         "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2",
         "-extfile", str(ext), "-out", str(crt), cwd=d)
    return crt, key


class NginxServer:
    """One nginx serving ``root``; its files live under ``tmp``. See the module docstring."""

    def __init__(self, root: Path, tmp: Path, *, read_only: bool = False, tls: bool = False,
                 client_certs: bool = False, basic_auth: tuple[str, str] | None = None,
                 bearer_token: str | None = None, port: int | None = None,
                 listing: bool = True, max_body: str = "0", full_put_path: bool = True,
                 deny_writes: bool = False) -> None:
        if basic_auth is not None and bearer_token is not None:
            raise ValueError("basic_auth and bearer_token are mutually exclusive")
        if bearer_token is not None and not _TOKEN_RE.fullmatch(bearer_token):
            raise ValueError("bearer_token must match [A-Za-z0-9._~+/=-]+")
        if basic_auth is not None and (":" in basic_auth[0] or "\n" in "".join(basic_auth)):
            raise ValueError("basic_auth user must not contain ':' or newlines")
        self.root = Path(root).resolve()
        self.prefix = Path(tmp).resolve()
        self.read_only = read_only or deny_writes
        self.deny_writes = deny_writes  # 403, not 405, to every method but GET and HEAD
        self.tls = tls or client_certs
        self.client_certs = client_certs
        self.basic_auth = basic_auth
        self.bearer_token = bearer_token
        self.listing = listing  # False: no autoindex, a directory URL answers 403
        self.max_body = max_body  # client_max_body_size: "0" is no limit; nginx's own default is "1m"
        self.full_put_path = full_put_path  # False: a PUT below a missing directory answers 409
        self._port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self.conf = self.prefix / "nginx.conf"
        self.error_log = self.prefix / "error.log"
        self.access_log = self.prefix / "access.log"
        self.pid_file = self.prefix / "nginx.pid"
        self._ca_file: Path | None = None
        self._client_cert: tuple[Path, Path] | None = None
        self._bad_client_cert: tuple[Path, Path] | None = None
        self._server_cert: tuple[Path, Path] | None = None
        self._prepared = False

    # -- properties --------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise NginxError("no port yet: start() the server first")
        return self._port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def ca_file(self) -> Path:
        if self._ca_file is None:
            raise NginxError("ca_file exists only with tls=True (after start())")
        return self._ca_file

    @property
    def client_cert(self) -> tuple[Path, Path]:
        """(cert, key) signed by ``ca_file``: nginx accepts it."""
        if self._client_cert is None:
            raise NginxError("client_cert exists only with client_certs=True (after start())")
        return self._client_cert

    @property
    def bad_client_cert(self) -> tuple[Path, Path]:
        """(cert, key) signed by another CA: nginx rejects it with 400."""
        if self._bad_client_cert is None:
            raise NginxError("bad_client_cert exists only with client_certs=True "
                             "(after start())")
        return self._bad_client_cert

    # -- setup -------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        self.prefix.mkdir(parents=True, exist_ok=True)
        for sub in ("logs", "temp/body", "temp/proxy", "temp/fastcgi", "temp/uwsgi",
                    "temp/scgi"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        if self.tls:
            certs = self.prefix / "certs"
            certs.mkdir(exist_ok=True)
            ca = _make_ca(certs, "ca")
            self._ca_file = ca[0]
            self._server_cert = _make_leaf(certs, "server", ca, server=True)
            if self.client_certs:
                self._client_cert = _make_leaf(certs, "client", ca, server=False)
                other = _make_ca(certs, "other-ca")
                self._bad_client_cert = _make_leaf(certs, "bad-client", other, server=False)
        if self.basic_auth is not None:
            user, password = self.basic_auth
            hashed = _run(OPENSSL, "passwd", "-apr1", "-stdin", cwd=self.prefix,
                          stdin=password + "\n").strip()
            (self.prefix / "htpasswd").write_text(f"{user}:{hashed}\n")
        self._prepared = True

    def _config(self) -> str:
        p = self.prefix
        lines = [
            "user root root;" if os.geteuid() == 0 else "",
            "worker_processes 1;",
            f"pid {self.pid_file};",
            f"error_log {self.error_log} info;",
            "events { worker_connections 512; }",
            "http {",
            f"  access_log {self.access_log};",
            f"  client_body_temp_path {p / 'temp/body'};",
            f"  proxy_temp_path {p / 'temp/proxy'};",
            f"  fastcgi_temp_path {p / 'temp/fastcgi'};",
            f"  uwsgi_temp_path {p / 'temp/uwsgi'};",
            f"  scgi_temp_path {p / 'temp/scgi'};",
            "  types { text/html html; application/json json; }",
            "  default_type application/octet-stream;",
            "  sendfile on;",
            "  absolute_redirect off;",
            "  server_tokens off;",
            "  server {",
            f"    listen {HOST}:{self.port}{' ssl' if self.tls else ''};",
            "    server_name localhost;",
            f"    root {self.root};",
        ]
        if self.tls:
            assert self._server_cert is not None
            lines += [f"    ssl_certificate {self._server_cert[0]};",
                      f"    ssl_certificate_key {self._server_cert[1]};"]
            if self.client_certs:
                lines += [f"    ssl_client_certificate {self._ca_file};",
                          "    ssl_verify_client on;"]
        if self.bearer_token is not None:
            lines.append(f'    if ($http_authorization != "Bearer {self.bearer_token}") '
                         "{ return 401; }")
        lines += ["    location / {",
                  f"      autoindex {'on' if self.listing else 'off'};",
                  "      autoindex_format json;",
                  f"      client_max_body_size {self.max_body};"]
        if self.basic_auth is not None:
            lines += ['      auth_basic "cafs";',
                      f"      auth_basic_user_file {p / 'htpasswd'};"]
        if self.deny_writes:
            lines.append("      limit_except GET HEAD { deny all; }")
        if not self.read_only:
            lines += ["      dav_methods PUT DELETE MKCOL COPY MOVE;",
                      f"      create_full_put_path {'on' if self.full_put_path else 'off'};",
                      "      dav_access user:rw group:r all:r;",
                      "      min_delete_depth 1;"]
        lines += ["    }", "  }", "}", ""]
        return "\n".join(line for line in lines if line)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        if self.running:
            return self
        self._prepare()
        if self._port is None:
            self._port = free_port()
        self.conf.write_text(self._config())
        log_mark = self.error_log.stat().st_size if self.error_log.exists() else 0
        self.pid_file.unlink(missing_ok=True)
        with open(self.prefix / "stdout.log", "ab") as out:
            self._proc = subprocess.Popen(
                [NGINX, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log),
                 "-g", "daemon off; master_process on;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise NginxError(f"nginx exited with {code} while starting:\n"
                                 f"{self._log_tail(log_mark)}")
            # nginx writes its pid file after binding its listening sockets: until then a
            # connect could reach some other process on the port
            if self._read_pid() == self._proc.pid:
                try:
                    socket.create_connection((HOST, self.port), timeout=1.0).close()
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.stop()
                raise NginxError(f"nginx did not accept connections on {HOST}:{self.port} "
                                 f"within {START_DEADLINE}s:\n{self._log_tail(log_mark)}")
            time.sleep(POLL)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                # The master leads its own session, so its group holds only it and its
                # workers (which outlive a killed master). It is not reaped yet, so the
                # group id cannot have been reused.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_DEADLINE)

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _log_tail(self, since: int = 0) -> str:
        parts = []
        for f in (self.error_log, self.prefix / "stdout.log"):
            try:
                with open(f, "rb") as fh:
                    if f == self.error_log:
                        fh.seek(since)
                    parts.append(fh.read()[-8000:].decode(errors="replace"))
            except OSError:
                pass
        return "\n".join(p for p in parts if p.strip()) or "(no log output)"

    def error_log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"NginxServer(root={str(self.root)!r}, url={self.url if self._port else None!r},"
                f" pid={self.pid})")


"""Keep-alive GETs on one connection per thread: the read path of the HTTP store.

A ranged GET is most of what a mount does, and ``http.client`` spends most of its CPU
parsing headers through the ``email`` package. This client writes the request in one
``sendall`` and reads only what a GET needs from the response: the status line and the
``Content-Length``, ``Transfer-Encoding`` and ``Connection`` headers. Writes and listings
stay on urllib3.

``get(target, headers, what, limit=)`` returns a ``Reply``: the status, the body, and the
``Content-Range`` header (for the caller to check that a partial answer holds the bytes it
asked for). A keep-alive connection the server closed meanwhile is reopened and the
request sent once more (GET is idempotent).
Errors: ``StoreError`` for a certificate that fails verification, ``StoreUnavailable``
for everything else that goes wrong on the wire (refused, reset, timed out, a body
shorter than its ``Content-Length``, a response that is not HTTP/1.x).

Bounded in time: the answer's first bytes must come within ``timeout`` seconds, the
rest at ``cafs.stores.pace.MIN_RATE`` on average (a socket timeout alone let a server
that trickles a byte now and then hold a GET for ever).

Bounded in size: a status line or header line over ``MAX_LINE`` bytes, more than ``MAX_HEADERS``
header or trailer lines, more than ``MAX_INTERIM`` interim responses (a server that sends
``100 Continue`` without end kept a GET going for ever: each arrives in time), a chunk-size line that is not hex, or a body over ``MAX_BODY``
is a broken response, not a reason to read without end. Bodies are ``Content-Length`` bytes, or chunked, or (HTTP/1.0 style)
everything up to the close. With ``limit`` (the most bytes the caller can use: a ranged
read needs at most its end, even from a server that ignores ``Range``), a longer body is
read only that far and its connection closed, so a server that sends an endless or huge
body to a small read costs ``limit`` bytes, not ``MAX_BODY``.

Bodies are taken as they are sent: the request accepts only the ``identity`` encoding, and
a body (of a 2xx answer) sent with another ``Content-Encoding`` (a compressing proxy), or
as ``multipart/byteranges`` (several ranges, where one was asked), is a broken response,
not bytes to return.

A connection is closed when its thread ends or when this object is collected (or the
interpreter exits), whichever comes first: no socket outlives its use, and closing one
that a thread is still reading from ends that read at once.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import weakref
from typing import TYPE_CHECKING, NamedTuple, cast
from urllib.parse import urlsplit

from cafs.errors import StoreError, StoreUnavailable
from cafs.stores.pace import Pace

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MAX_LINE = 64 << 10
MAX_HEADERS = 200
MAX_INTERIM = 8  # 1xx responses before the real one (100 Continue, 103 Early Hints)
MAX_BODY = 1 << 32
READ_BUFFER = 64 << 10
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class Reply(NamedTuple):
    status: int
    body: bytes
    content_range: str | None  # the header's value, if the answer had one


class _Head(NamedTuple):
    length: int | None  # Content-Length
    chunked: bool
    close: bool | None  # Connection: close / keep-alive / not said
    content_range: str | None
    encoding: bytes | None  # Content-Encoding, lower case
    multipart: bool  # Content-Type: multipart/byteranges


class _Broken(Exception):
    """The response cannot be parsed; the message says how."""


class _PacedSocket(io.RawIOBase):
    """The socket's bytes, each wait bounded by what is left of the answer's ``Pace``."""

    def __init__(self, sock: socket.socket, pace: Pace) -> None:
        super().__init__()
        self.sock = sock
        self.pace = pace

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self.sock.settimeout(self.pace.left())
        try:
            n = self.sock.recv_into(buffer)
        except TimeoutError:
            self.pace.left()  # says so when the wait was cut short by the answer's pace
            raise
        self.pace.got(n)
        return n


class _Connection:
    __slots__ = ("sock", "rfile", "pace", "__weakref__")

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.pace = Pace(timeout)
        self.rfile = cast(io.BufferedReader, io.BufferedReader(_PacedSocket(sock, self.pace), READ_BUFFER))

    def close(self) -> None:
        # A thread still reading (a stalled GET, at interpreter exit) holds the buffered
        # reader's lock until its timeout: shutting the socket down first ends its read
        # now, instead of the close waiting for it (a daemon lingered 10 s after unmounting).
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more
        try:
            self.rfile.close()
        finally:
            self.sock.close()


class KeepAliveGets:
    def __init__(self, url: str, context: ssl.SSLContext | None, timeout: float) -> None:
        """``context``: the TLS settings for an https ``url`` (None for http)."""
        parts = urlsplit(url)
        default = 443 if context is not None else 80
        self._host = parts.hostname or ""
        self._port = parts.port or default
        self._host_header = host_header(self._host, self._port, default)
        self._timeout = timeout
        self._context = context
        self._local = threading.local()
        self._open: weakref.WeakSet[_Connection] = weakref.WeakSet()
        weakref.finalize(self, _close_all, self._open)

    def get(self, target: str, headers: dict[str, str], what: str, *, limit: int | None = None) -> Reply:
        """``limit``: read at most that many bytes of the body (see the module docstring)."""
        lines = [f"GET {target} HTTP/1.1", f"Host: {self._host_header}", "Accept-Encoding: identity"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in range(2):
            conn, reused = self._connection(what)
            try:
                conn.pace.restart()
                conn.sock.settimeout(self._timeout)
                conn.sock.sendall(request)
                reply, will_close = _response(conn.rfile, conn.sock, limit)
            except ssl.SSLCertVerificationError as exc:
                self._drop()
                raise StoreError(f"{what}: TLS failed: {exc.verify_message or exc}") from None
            except (_Closed, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection
                raise StoreUnavailable(f"{what}: GET failed: {exc or type(exc).__name__}") from None
            except (OSError, _Broken) as exc:
                self._drop()
                raise StoreUnavailable(f"{what}: GET failed: {exc or type(exc).__name__}") from None
            if will_close:
                self._drop()
            return reply
        raise AssertionError("unreachable")

    def _connection(self, what: str) -> tuple[_Connection, bool]:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=self._host)
        except ssl.SSLCertVerificationError as exc:
            raise StoreError(f"{what}: TLS failed: {exc.verify_message or exc}") from None
        except OSError as exc:
            raise StoreUnavailable(f"{what}: GET failed: {exc.strerror or exc}") from None
        conn = _Connection(sock, self._timeout)
        self._local.conn = conn
        self._open.add(conn)
        self._local.closer = weakref.finalize(threading.current_thread(), conn.close)
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self._local.closer.detach()
            conn.close()


class _Closed(Exception):
    """The server closed the connection before the response began."""


def _response(rfile: io.BufferedReader, sock: socket.socket, limit: int | None) -> tuple[Reply, bool]:
    """Read one response to a GET: ``(reply, whether the connection closes)``; at most
    ``limit`` bytes of its body (then the connection closes: the rest is not read)."""
    interim = 0
    while True:
        line = _line(rfile, first=not interim)
        ack_now(sock)
        version, _, rest = line.partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or not code.isdigit():
            raise _Broken(f"not an HTTP/1.x status line: {line[:80]!r}")
        status = int(code)
        head = _headers(rfile)
        if not 100 <= status < 200:
            break  # an interim 1xx response is followed by the real one
        interim += 1
        if interim > MAX_INTERIM:
            raise _Broken(f"more than {MAX_INTERIM} interim (1xx) responses")
    close = head.close
    if version == b"HTTP/1.0":
        close = close is not False  # 1.0 closes unless it says keep-alive
    if 200 <= status < 300 and head.encoding not in (None, b"identity"):
        raise _Broken(f"a body sent with Content-Encoding {head.encoding[:40].decode('latin-1')!r}, "
                      "though only identity was accepted (a compressing proxy?)")
    if status == 206 and head.multipart:
        raise _Broken("several ranges (multipart/byteranges) where one was asked for")
    if status in (204, 304):
        return Reply(status, b"", head.content_range), bool(close)
    if head.chunked:
        body, cut = _chunked(rfile, limit)
        return Reply(status, body, head.content_range), bool(close) or cut
    if head.length is None:
        body = _read(rfile, None, limit)
        return Reply(status, body, head.content_range), True
    body = _read(rfile, head.length, limit)
    return Reply(status, body, head.content_range), bool(close) or len(body) < head.length


def host_header(host: str, port: int, default_port: int) -> str:
    """The ``Host`` header's value: an IPv6 address in brackets, the port unless default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == default_port else f"{name}:{port}"


def ack_now(sock: socket.socket) -> None:
    """Acknowledge what has arrived at once instead of after the delayed-ACK timer.

    A server that sends a response corked (nginx's ``tcp_nopush on``, Debian's default)
    and then uncorks with Nagle's algorithm on holds the response's last partial segment
    until its previous one is acknowledged; a client that received a single full segment
    delays that acknowledgement by 40 ms. On loopback every response of one to two
    segments (64-128 KiB) waited so: 38 ms instead of 0.2 ms."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass  # a hint; the response still arrives


def _headers(rfile: io.BufferedReader) -> _Head:
    length: int | None = None
    chunked = multipart = False
    close: bool | None = None
    content_range: str | None = None
    encoding: bytes | None = None
    for _ in range(MAX_HEADERS):
        line = _line(rfile)
        if line in (b"\r\n", b"\n"):
            return _Head(length, chunked, close, content_range, encoding, multipart)
        name, sep, value = line.partition(b":")
        if not sep:
            raise _Broken(f"a header line without a colon: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if not value.isdigit():
                raise _Broken(f"Content-Length {value[:40]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().endswith(b"chunked")
        elif name == b"connection":
            tokens = value.lower()
            close = True if b"close" in tokens else False if b"keep-alive" in tokens else close
        elif name == b"content-range":
            content_range = value.decode("latin-1")
        elif name == b"content-encoding":
            encoding = value.lower()
        elif name == b"content-type":
            multipart = value.lower().startswith(b"multipart/byteranges")
    raise _Broken(f"more than {MAX_HEADERS} header lines")


def _line(rfile: io.BufferedReader, *, first: bool = False) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        if first:
            raise _Closed("the server closed the connection")
        raise _Broken("the connection closed inside the headers")
    if len(line) > MAX_LINE:
        raise _Broken(f"a line over {MAX_LINE} bytes")
    return line


def _read(rfile: io.BufferedReader, n: int | None, limit: int | None = None) -> bytes:
    """A body of ``n`` bytes (None: up to the close), or its first ``limit`` bytes."""
    if n is not None and n > MAX_BODY and (limit is None or limit > MAX_BODY):
        raise _Broken(f"a body of {n} bytes, over the limit of {MAX_BODY}")
    want = MAX_BODY if n is None else n
    if limit is not None and limit < want:
        data = rfile.read(limit)
        if n is not None and len(data) != limit:
            raise _Broken(f"the body ended after {len(data)} of {n} bytes")
        return data
    data = rfile.read(want)
    if n is None and len(data) == MAX_BODY and rfile.peek(1):
        raise _Broken(f"a body over the limit of {MAX_BODY} bytes")
    if n is not None and len(data) != n:
        raise _Broken(f"the body ended after {len(data)} of {n} bytes")
    return data


def _chunked(rfile: io.BufferedReader, limit: int | None) -> tuple[bytes, bool]:
    """A chunked body, and whether it was cut at ``limit`` (the rest left unread)."""
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = _line(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise _Broken(f"a chunk size that is not hex: {size_line[:40]!r}") from None
        if size == 0:
            break
        if limit is not None and total + size >= limit:
            parts.append(_read(rfile, size, limit - total))
            return b"".join(parts), True
        total += size
        if total > MAX_BODY:
            raise _Broken(f"a chunked body over the limit of {MAX_BODY} bytes")
        parts.append(_read(rfile, size))
        if _line(rfile) not in (b"\r\n", b"\n"):
            raise _Broken("a chunk not followed by CRLF")
    for _ in range(MAX_HEADERS):  # trailers: ignored
        if _line(rfile) in (b"\r\n", b"\n"):
            return b"".join(parts), False
    raise _Broken(f"more than {MAX_HEADERS} trailer lines")


def _close_all(conns: weakref.WeakSet[_Connection]) -> None:
    for conn in list(conns):
        conn.close()

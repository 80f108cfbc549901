"""A fault-injecting HTTP/1.1 proxy for remote-store tests: drops, stalls, short and corrupt
answers, between a client and one upstream server (normally ``tests/nginx.py``).

Contract:

- ``FaultProxy(upstream_url)`` listens on ``127.0.0.1`` (a free port, or ``port=``) once
  ``start()`` is called (or ``with FaultProxy(...) as proxy:``) and forwards plain HTTP to
  ``upstream_url`` (``http://host:port``; HTTPS cannot be proxied at the HTTP level and is
  refused with ``ValueError``). ``url`` is ``http://127.0.0.1:PORT``.
- It works at the HTTP level, not on raw bytes: it reads each request (request line,
  headers, a ``Content-Length`` or chunked body), forwards it on its own upstream
  connection (one per client connection, reopened when upstream closes it), and reads the
  response (``Content-Length``, chunked, or close-delimited). So client keep-alive works,
  and a fault hits one chosen response while other requests, on the same connection or
  others, pass. Chunked and close-delimited response bodies are de-chunked and sent to
  the client with ``Content-Length`` (nginx sends autoindex JSON chunked); everything else
  goes through byte for byte, streamed. ``Expect: 100-continue`` is answered by the proxy
  itself and not forwarded.
- ``set_mode(mode, ...)`` is thread-safe and takes effect for requests read after it
  returns (and, for ``refuse``, for connections). Modes:

  ``pass``            transparent.
  ``refuse``          the listening socket is closed, so connects get ECONNREFUSED, and
                      every open client connection is shut down (a server that went away
                      leaves no live keep-alive connection). Any other mode reopens the
                      listener on the same port before ``set_mode`` returns.
  ``reset_mid_body``  forward the status line, headers and ``at`` bytes of the body (default:
                      half), then reset the client connection (``SO_LINGER`` 0, so RST).
  ``stall``           read the request, forward nothing, answer nothing for ``seconds``
                      (``None``: until the mode changes or the proxy stops); then the request
                      is forwarded as in ``pass`` (a slow server).
  ``short_body``      headers with the original ``Content-Length``, ``at`` bytes of the body
                      (default: half), then a clean close (FIN).
  ``flip_bytes``      the byte at body offset ``at`` (default: the middle) is XORed with 0xFF;
                      length and headers unchanged.
  ``status``          answer ``status`` (default 500) with a short text body, without
                      contacting upstream; the connection stays usable.

  Every mode but ``refuse`` can be scoped: ``match`` (a regex ``re.search``-ed in the
  request target, e.g. ``r"^/data/"``), ``method`` (e.g. ``"GET"``), ``ranged`` (True: only
  requests with a ``Range`` header; False: only without), ``skip`` (the first that many
  requests in scope pass, e.g. a command's own check before the daemon it starts asks the
  same), and ``times`` (the fault fires for that many requests, then the proxy passes
  everything; ``None``: no limit). Requests out of scope pass. The body faults (``reset_mid_body``, ``short_body``, ``flip_bytes``) only fire
  on responses with a non-empty body (not HEAD, 204, 304); a bodiless response passes and
  does not use up ``times``.
- ``seen()`` lists every request read (method, target, path, Range header, and the mode of
  the fault that matched it or ``None``), ``counts()`` counts requests per path (target
  without its query), ``faults_fired`` counts faults actually applied; ``reset_seen()``.
- ``stop()`` closes the listener, shuts down every client and upstream socket, wakes stalled
  requests, joins every thread it started (raising ``RuntimeError`` if one does not end
  within ``JOIN_DEADLINE``), and then re-raises as ``RuntimeError`` the first unexpected
  exception a connection thread hit (a bug in the proxy, not a fault it injected).

Behaviour when things go wrong: a malformed request or response, an unreachable upstream
(e.g. nginx stopped), or an upstream that times out (``upstream_timeout``) makes the proxy
reset the client connection, like a dead server would.

Caveats:

- Requests are handled one at a time per connection (pipelined requests wait their turn).
- Request bodies and de-chunked response bodies are held in memory: fine for tests, not
  for gigabytes.
- Threads, not trio: the proxy runs beside trio tests without sharing their event loop.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self, get_args
from urllib.parse import urlsplit

Mode = Literal["pass", "refuse", "reset_mid_body", "stall", "short_body", "flip_bytes",
               "status"]
MODES: frozenset[str] = frozenset(get_args(Mode))
BODY_FAULTS: frozenset[str] = frozenset({"reset_mid_body", "short_body", "flip_bytes"})
HOST = "127.0.0.1"
MAX_HEAD = 64 * 1024
RECV = 64 * 1024
JOIN_DEADLINE = 5.0
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            408: "Request Timeout", 409: "Conflict", 412: "Precondition Failed",
            429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


class _ProtocolError(Exception):
    """Malformed HTTP or a connection that ended mid-message."""


@dataclass(frozen=True)
class Fault:
    """One mode and its scope. See the module docstring."""

    mode: Mode = "pass"
    match: re.Pattern[str] | None = None
    method: str | None = None
    ranged: bool | None = None
    at: int | None = None
    seconds: float | None = None
    status: int = 500
    times: int | None = None

    def scoped_to(self, req: _Request) -> bool:
        if self.mode in ("pass", "refuse"):
            return False
        if self.match is not None and not self.match.search(req.target):
            return False
        if self.method is not None and req.method != self.method:
            return False
        return self.ranged is None or (req.header("range") is not None) == self.ranged


@dataclass(frozen=True)
class Seen:
    """One request the proxy read."""

    method: str
    target: str
    path: str
    range: str | None
    fault: Mode | None


class _Stream:
    """A socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(RECV)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """Bytes up to and including the blank line; None at EOF before any byte."""
        start = 0
        while True:
            i = self.buf.find(b"\r\n\r\n", start)
            if i >= 0:
                head = bytes(self.buf[:i + 4])
                del self.buf[:i + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise _ProtocolError("header section too long")
            start = max(0, len(self.buf) - 3)
            if not self._fill():
                if self.buf.strip():
                    raise _ProtocolError("connection closed inside a header section")
                return None

    def read_line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise _ProtocolError("line too long")
            if not self._fill():
                raise _ProtocolError("connection closed inside a line")
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise _ProtocolError("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one); raises at EOF."""
        if not self.buf and not self._fill():
            raise _ProtocolError("connection closed inside a body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = self.read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise _ProtocolError(f"bad chunk size {size_line!r}") from None
            if size == 0:
                while self.read_line():  # trailers, then the blank line
                    pass
                return bytes(out)
            out += self.read_exact(size)
            if self.read_exact(2) != b"\r\n":
                raise _ProtocolError("chunk not followed by CRLF")


class _Message:
    """A parsed request or response head."""

    def __init__(self, head: bytes) -> None:
        lines = head[:-4].decode("latin-1").split("\r\n")
        self.start = lines[0]
        self.headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _ProtocolError(f"bad header line {line!r}")
            self.headers.append((name, value.strip()))

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every ``name`` header, lower-cased."""
        name = name.lower()
        return {t.strip().lower() for k, v in self.headers if k.lower() == name
                for t in v.split(",") if t.strip()}

    def without(self, *names: str) -> list[tuple[str, str]]:
        drop = {n.lower() for n in names}
        return [(k, v) for k, v in self.headers if k.lower() not in drop]

    def content_length(self) -> int | None:
        values = {v for k, v in self.headers if k.lower() == "content-length"}
        if not values:
            return None
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise _ProtocolError(f"bad Content-Length {values!r}")
        return int(next(iter(values)))


class _Request(_Message):
    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        parts = self.start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _ProtocolError(f"bad request line {self.start!r}")
        self.method, self.target, self.version = parts
        if self.target.startswith(("http://", "https://")):
            split = urlsplit(self.target)
            self.target = split.path + (f"?{split.query}" if split.query else "") or "/"
        self.path = self.target.split("?", 1)[0]
        self.body = b""

    def keep_alive(self) -> bool:
        conn = self.tokens("connection")
        return "keep-alive" in conn if self.version == "HTTP/1.0" else "close" not in conn


class _Response(_Message):
    def __init__(self, head: bytes) -> None:
        super().__init__(head)
        parts = self.start.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _ProtocolError(f"bad status line {self.start!r}")
        self.version = parts[0]
        self.status = int(parts[1])

    def keep_alive(self) -> bool:
        conn = self.tokens("connection")
        return "keep-alive" in conn if self.version == "HTTP/1.0" else "close" not in conn


def _head(start: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([start, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode(
        "latin-1")


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Close(Exception):
    """End this client connection (``reset``: with an RST)."""

    def __init__(self, reset: bool) -> None:
        super().__init__()
        self.reset = reset


class FaultProxy:
    """See the module docstring."""

    def __init__(self, upstream_url: str, *, port: int | None = None,
                 upstream_timeout: float = 30.0) -> None:
        split = urlsplit(upstream_url)
        if split.scheme != "http" or not split.hostname or split.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream_url!r}")
        self.upstream = (split.hostname, split.port)
        self.upstream_timeout = upstream_timeout
        self._port = port
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._fault = Fault()
        self._remaining: int | None = None
        self._skip_left = 0
        self._generation = 0
        self._applied = 0  # the generation whose listener state the acceptor has applied
        self._bind_error: OSError | None = None
        self._stopping = False
        self._started = False
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._seen: list[Seen] = []
        self._fired = 0
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._acceptor: threading.Thread | None = None

    # -- public API --------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("no port yet: start() the proxy first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def mode(self) -> Mode:
        with self._lock:
            return self._fault.mode

    @property
    def faults_fired(self) -> int:
        with self._lock:
            return self._fired

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(s.path for s in self._seen)

    def reset_seen(self) -> None:
        with self._lock:
            self._seen.clear()
            self._fired = 0

    def start(self) -> Self:
        if self._started:
            raise RuntimeError("a FaultProxy starts once")
        listener = self._bind()
        self._port = listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._started = True
        self._acceptor = threading.Thread(target=self._accept_loop, args=(listener,),
                                          name=f"faultproxy-accept-{self._port}", daemon=True)
        self._acceptor.start()
        return self

    def set_mode(self, mode: Mode, *, match: str | None = None, method: str | None = None,
                 ranged: bool | None = None, at: int | None = None,
                 seconds: float | None = None, status: int = 500,
                 times: int | None = None, skip: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {sorted(MODES)}")
        if mode == "refuse" and (match or method or ranged is not None or times is not None):
            raise ValueError("refuse applies to connections: it takes no scope")
        if at is not None and at < 0:
            raise ValueError("at must be >= 0")
        if times is not None and times < 1:
            raise ValueError("times must be >= 1")
        if skip < 0 or (skip and mode == "refuse"):
            raise ValueError("skip must be >= 0, and refuse takes none")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = Fault(mode, re.compile(match) if match is not None else None,
                      method.upper() if method else None, ranged, at, seconds, status, times)
        with self._cond:
            if self._stopping or not self._started:
                raise RuntimeError("set_mode needs a running proxy")
            self._fault = fault
            self._remaining = times
            self._skip_left = skip
            self._generation += 1
            generation = self._generation
            self._bind_error = None
            self._cond.notify_all()
            if mode == "refuse":
                for s in self._socks:
                    _shutdown(s)
        self._wake()
        with self._cond:
            self._cond.wait_for(lambda: self._applied >= generation or self._stopping,
                                timeout=JOIN_DEADLINE)
            if self._bind_error is not None:
                raise RuntimeError(f"cannot listen on {HOST}:{self._port} again: "
                                   f"{self._bind_error}")
            if self._applied < generation and not self._stopping:
                raise RuntimeError("the accept thread did not apply the new mode")

    def stop(self) -> None:
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._cond.notify_all()
            for s in self._socks:
                _shutdown(s)
        self._wake()
        stuck: list[str] = []
        threads = ([self._acceptor] if self._acceptor else []) + self._threads_snapshot()
        for t in threads:
            t.join(JOIN_DEADLINE)
            if t.is_alive():
                stuck.append(t.name)
        # connection threads started between the snapshot and the acceptor's exit
        for t in self._threads_snapshot():
            t.join(JOIN_DEADLINE)
            if t.is_alive() and t.name not in stuck:
                stuck.append(t.name)
        for w in (self._wake_r, self._wake_w):
            if w is not None:
                w.close()
        if stuck:
            raise RuntimeError(f"fault proxy threads did not stop: {stuck}")
        if self._errors:
            raise RuntimeError(f"fault proxy hit an unexpected error: {self._errors[0]!r}"
                               ) from self._errors[0]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FaultProxy(upstream={self.upstream!r}, port={self._port}, mode={self.mode!r})"

    # -- accepting ---------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, self._port or 0))
            s.listen(128)
        except OSError:
            s.close()
            raise
        return s

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"x")
        except OSError:
            pass

    def _threads_snapshot(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def _accept_loop(self, listener: socket.socket | None) -> None:
        """Owns the listening socket: opens and closes it as the mode asks."""
        assert self._wake_r is not None
        wake = self._wake_r
        sel = selectors.DefaultSelector()
        sel.register(wake, selectors.EVENT_READ)
        if listener is not None:
            sel.register(listener, selectors.EVENT_READ)
        n = 0
        try:
            while True:
                with self._cond:
                    if self._stopping:
                        return
                    refuse = self._fault.mode == "refuse"
                    generation = self._generation
                if refuse and listener is not None:
                    sel.unregister(listener)
                    listener.close()
                    listener = None
                elif not refuse and listener is None:
                    try:
                        listener = self._bind()
                    except OSError as e:
                        with self._cond:
                            self._bind_error = e
                    if listener is not None:
                        sel.register(listener, selectors.EVENT_READ)
                with self._cond:
                    self._applied = max(self._applied, generation)
                    self._cond.notify_all()
                for key, _ in sel.select():
                    if key.fileobj is wake:
                        wake.recv(4096)
                    elif listener is not None:
                        try:
                            client, _addr = listener.accept()
                        except OSError:
                            continue
                        n += 1
                        t = threading.Thread(target=self._serve, args=(client,),
                                             name=f"faultproxy-conn-{self._port}-{n}",
                                             daemon=True)
                        with self._cond:
                            if self._stopping or self._fault.mode == "refuse":
                                client.close()
                                continue
                            self._socks.add(client)
                            self._threads = [x for x in self._threads if x.is_alive()]
                            self._threads.append(t)
                        t.start()
        except BaseException as e:  # a bug: report it from stop()
            with self._cond:
                self._errors.append(e)
        finally:
            if listener is not None:
                listener.close()
            sel.close()
            with self._cond:
                self._applied = max(self._applied, self._generation)
                self._cond.notify_all()

    # -- one client connection ---------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        up: _Stream | None = None
        reset = False
        try:
            c = _Stream(client)
            while True:
                req = self._read_request(c)
                if req is None:
                    return
                fault = self._decide(req)
                if fault.mode == "stall":
                    self._stall(fault)
                    fault = Fault()
                if fault.mode == "status":
                    keep = self._answer_status(client, req, fault.status)
                    if not keep:
                        return
                    continue
                up, keep = self._forward(c, req, up, fault)
                if not keep:
                    return
        except _Close as e:
            reset = e.reset
        except (OSError, _ProtocolError):
            reset = True
        except BaseException as e:  # a bug: report it from stop()
            reset = True
            with self._cond:
                self._errors.append(e)
        finally:
            if up is not None:
                self._drop(up.sock)
            if reset:
                _reset(client)
            self._drop(client)

    def _drop(self, sock: socket.socket) -> None:
        with self._cond:
            self._socks.discard(sock)
        sock.close()

    def _read_request(self, c: _Stream) -> _Request | None:
        head = c.read_head()
        if head is None:
            return None
        req = _Request(head)
        framed = True
        if "chunked" in req.tokens("transfer-encoding"):
            self._continue(c, req)
            req.body = c.read_chunked()
        elif (n := req.content_length()) is not None:
            self._continue(c, req)
            req.body = c.read_exact(n)
        else:
            framed = False
        # forwarded with a Content-Length whatever framing the client chose
        req.headers = req.without("expect", "transfer-encoding", "content-length")
        if framed:
            req.headers.append(("Content-Length", str(len(req.body))))
        return req

    @staticmethod
    def _continue(c: _Stream, req: _Request) -> None:
        if "100-continue" in req.tokens("expect"):
            c.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _decide(self, req: _Request) -> Fault:
        """Record ``req``; the fault that applies to it (``pass`` when none)."""
        with self._cond:
            fault = self._fault
            scoped = fault.scoped_to(req) and self._remaining != 0
            if scoped and self._skip_left > 0:
                self._skip_left -= 1
                scoped = False
            if scoped and fault.mode not in BODY_FAULTS:
                self._use(fault)
            self._seen.append(Seen(req.method, req.target, req.path, req.header("range"),
                                   fault.mode if scoped else None))
            return fault if scoped else Fault()

    def _use(self, fault: Fault) -> bool:
        """Count one firing of ``fault``; False if its ``times`` ran out. Holds the lock."""
        if fault is self._fault and self._remaining is not None:
            if self._remaining <= 0:
                return False
            self._remaining -= 1
        self._fired += 1
        return True

    def _stall(self, fault: Fault) -> None:
        with self._cond:
            generation = self._generation
            self._cond.wait_for(lambda: self._stopping or self._generation != generation,
                                timeout=fault.seconds)
            if self._stopping:
                raise _Close(reset=False)

    def _answer_status(self, client: socket.socket, req: _Request, status: int) -> bool:
        keep = req.keep_alive()
        body = f"{status} injected by fault proxy\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                   ("X-Fault-Proxy", "status")]
        if not keep:
            headers.append(("Connection", "close"))
        start = f"HTTP/1.1 {status} {_REASONS.get(status, 'Injected')}"
        client.sendall(_head(start, headers) + (b"" if req.method == "HEAD" else body))
        return keep

    def _connect(self) -> _Stream:
        try:
            s = socket.create_connection(self.upstream, timeout=self.upstream_timeout)
        except OSError:
            raise _Close(reset=True) from None
        with self._cond:
            if self._stopping:
                s.close()
                raise _Close(reset=True)
            self._socks.add(s)
        return _Stream(s)

    def _forward(self, c: _Stream, req: _Request, up: _Stream | None,
                 fault: Fault) -> tuple[_Stream | None, bool]:
        """Send ``req`` upstream and its response to the client, applying ``fault``.

        Returns the upstream stream to reuse (None if closed) and whether the client
        connection stays open."""
        wire = _head(f"{req.method} {req.target} {req.version}", req.headers) + req.body
        try:
            if up is not None:
                try:
                    up.sock.sendall(wire)
                    head = up.read_head()
                except (ConnectionError, _ProtocolError):
                    head = None
                if head is None:
                    # the idle upstream connection was closed under us: use a fresh one
                    self._drop(up.sock)
                    up = None
            if up is None:
                up = self._connect()
                up.sock.sendall(wire)
                head = up.read_head()
            if head is None:
                raise _Close(reset=True)
            return self._relay(c, req, up, _Response(head), fault)
        except BaseException as e:
            if up is not None:
                self._drop(up.sock)
            if isinstance(e, TimeoutError):
                raise _Close(reset=True) from None
            raise

    def _relay(self, c: _Stream, req: _Request, up: _Stream, resp: _Response,
               fault: Fault) -> tuple[_Stream | None, bool]:
        client = c.sock
        keep_up = resp.keep_alive()
        headers = resp.headers
        length: int | None
        body: bytes | None = None  # a body already read whole
        if req.method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            length = 0
            stream_len = 0
        elif "chunked" in resp.tokens("transfer-encoding"):
            body = up.read_chunked()
            length = stream_len = len(body)
            headers = [*resp.without("transfer-encoding", "content-length"),
                       ("Content-Length", str(length))]
        elif (length := resp.content_length()) is not None:
            stream_len = length
        else:
            body = up.read_to_eof()
            keep_up = False
            length = stream_len = len(body)
            headers = [*resp.without("content-length"), ("Content-Length", str(length))]
        keep_client = req.keep_alive() and resp.keep_alive()

        fire = False
        if fault.mode in BODY_FAULTS and stream_len > 0:
            with self._cond:
                fire = self._use(fault)
        cut: int | None = None
        flip: int | None = None
        if fire and fault.mode == "flip_bytes":
            flip = min(fault.at if fault.at is not None else stream_len // 2, stream_len - 1)
        elif fire:
            cut = min(fault.at if fault.at is not None else stream_len // 2, stream_len - 1)

        client.sendall(_head(resp.start, headers))
        sent = 0
        while sent < stream_len:
            if cut is not None and sent >= cut:
                # stop reading mid-response: this upstream connection is now useless
                self._drop(up.sock)
                raise _Close(reset=fault.mode == "reset_mid_body")
            want = stream_len - sent if cut is None else cut - sent
            if body is not None:
                piece = body[sent:sent + min(want, RECV)]
            else:
                piece = up.read_some(min(want, RECV))
            if flip is not None and sent <= flip < sent + len(piece):
                b = bytearray(piece)
                b[flip - sent] ^= 0xFF
                piece = bytes(b)
            client.sendall(piece)
            sent += len(piece)
        if not keep_up:
            self._drop(up.sock)
            return None, keep_client
        return up, keep_client


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)

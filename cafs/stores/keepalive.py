"""Keep-alive GETs on one ``http.client`` connection per thread: the read path of the
HTTP store. A ranged GET costs about half the CPU of the same request through urllib3's
pool (108 against 213 us for 140 KB on loopback, measured), and reads are most of what a
mount does; writes and listings stay on urllib3.

``get(target, headers)`` returns ``(status, body)``. A keep-alive connection the server
closed meanwhile is reopened and the request sent once more (GET is idempotent). Errors:
``StoreError`` for a certificate that fails verification, ``StoreUnavailable`` for
everything else that goes wrong on the wire (refused, reset, timed out, short body).
Bodies are read whole and checked against Content-Length by ``http.client``.

A connection is closed when its thread ends (trio's idle worker threads do) or when this
object is collected, whichever comes first: no socket outlives its use.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import weakref
from urllib.parse import urlsplit

from cafs.errors import StoreError, StoreUnavailable


class KeepAliveGets:
    def __init__(self, url: str, context: ssl.SSLContext | None, timeout: float) -> None:
        """``context``: the TLS settings for an https ``url`` (None for http)."""
        parts = urlsplit(url)
        self._host = parts.hostname or ""
        self._port = parts.port
        self._timeout = timeout
        self._context = context
        self._local = threading.local()
        self._open: weakref.WeakSet[http.client.HTTPConnection] = weakref.WeakSet()
        weakref.finalize(self, _close_all, self._open)

    def get(self, target: str, headers: dict[str, str], what: str) -> tuple[int, bytes]:
        for attempt in range(2):
            conn, reused = self._connection()
            try:
                conn.request("GET", target, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except ssl.SSLCertVerificationError as exc:
                self._drop()
                raise StoreError(f"{what}: TLS failed: {exc.verify_message or exc}") from None
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                if reused and attempt == 0:
                    continue  # the server closed an idle keep-alive connection
                raise StoreUnavailable(f"{what}: GET failed: {exc or type(exc).__name__}") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise StoreUnavailable(f"{what}: GET failed: {exc or type(exc).__name__}") from None
            if resp.will_close:
                self._drop()
            return resp.status, body
        raise AssertionError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        if self._context is not None:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._context)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
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


def _close_all(conns: weakref.WeakSet[http.client.HTTPConnection]) -> None:
    for conn in list(conns):
        conn.close()

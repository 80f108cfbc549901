"""A throw-away HTTP server on 127.0.0.1 in a daemon thread, for fakes whose answers a
test writes itself (a redirecting front end, a cloud metadata service).

``FakeServer(handler)`` serves at once on a free port (``port``, ``url``); ``close()``
stops it and frees the port. ``QuietHandler`` is a request handler that logs nothing;
its ``answer`` sends a whole response.
"""

from __future__ import annotations

import http.server
import threading


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """A whole response: ``status``, ``headers``, ``body`` with its Content-Length."""
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FakeServer:
    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

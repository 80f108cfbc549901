"""pytest fixtures for remote-store tests: real nginx servers and fault proxies that are
always stopped. Loaded as a plugin (``pytest_plugins = ["remote_fixtures"]`` in
``tests/conftest.py``).

Contract:

- ``nginx_server`` is a factory: ``nginx_server(root, **options)`` starts an
  ``NginxServer`` (``tests/nginx.py``) serving ``root`` with its private files in a fresh
  directory under ``tmp_path`` and returns it running; ``options`` are the constructor's
  (``read_only``, ``tls``, ``client_certs``, ``basic_auth``, ``bearer_token``, ``port``).
  With no ``root`` it serves a fresh empty directory. At teardown every server it started
  is stopped (by PID, in ``finally``), even if the test failed or stopped one already.
- ``fault_proxy`` is a factory too: ``fault_proxy(upstream)`` starts a ``FaultProxy``
  (``tests/faultproxy.py``) in front of an ``NginxServer`` or an ``http://host:port`` URL;
  at teardown every proxy is stopped and its threads joined. A proxy thread's unexpected
  error fails the test at teardown.
- Proxies are stopped before servers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from faultproxy import FaultProxy
from nginx import NginxServer


class StartNginx(Protocol):
    def __call__(self, root: Path | None = None, **options: Any) -> NginxServer: ...


class StartProxy(Protocol):
    def __call__(self, upstream: NginxServer | str, **options: Any) -> FaultProxy: ...


@pytest.fixture
def nginx_server(tmp_path: Path) -> Iterator[StartNginx]:
    servers: list[NginxServer] = []
    counter = itertools.count()

    def start(root: Path | None = None, **options: Any) -> NginxServer:
        n = next(counter)
        if root is None:
            root = tmp_path / f"nginx-root-{n}"
            root.mkdir()
        server = NginxServer(root, tmp_path / f"nginx-{n}", **options)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        errors: list[BaseException] = []
        for server in reversed(servers):
            try:
                server.stop()
            except BaseException as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def fault_proxy(nginx_server: StartNginx) -> Iterator[StartProxy]:
    # depends on nginx_server so that proxies are torn down first
    proxies: list[FaultProxy] = []

    def start(upstream: NginxServer | str, **options: Any) -> FaultProxy:
        url = upstream.url if isinstance(upstream, NginxServer) else upstream
        proxy = FaultProxy(url, **options)
        proxies.append(proxy)
        return proxy.start()

    try:
        yield start
    finally:
        errors: list[BaseException] = []
        for proxy in reversed(proxies):
            try:
                proxy.stop()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]

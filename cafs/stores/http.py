"""A store behind an HTTP(S) server (``http://`` and ``https://`` URLs).

Reads need nothing but a static web server: ``get`` is a GET with a ``Range`` header
(a server that ignores ranges still works, at the cost of whole-object transfers), and
``list`` reads the server's directory index of ``PREFIX/`` — nginx's
``autoindex_format json`` (names, types and sizes in one request), or any HTML index
whose links name the entries (sizes then come from HEAD requests). A read the server
redirects (3xx with ``Location``) is made again following up to ``MAX_REDIRECTS``
redirects, without the credentials when one leads to another host.

The URL's path is percent-encoded once, as UTF-8, when the store is opened (a raw
``/données/my repo`` and ``/donn%C3%A9es/my%20repo`` name the same directory), so every
request names an object the same way.

Without a directory index (nginx without ``autoindex``: 403 for a directory URL), ``list``
raises ``ListingUnavailable``; the repository then finds a ref's snapshots from its
``latest`` pointer (see ``cafs.repository``), so mounts and gets of ``REPO#NAME`` still
work.

Writes use WebDAV as nginx's dav module provides it: ``put`` is a PUT (the server writes
a temporary file and renames it, so readers see all of an object or nothing; missing
parent collections, the repository's own included, are made with MKCOL when the server
does not create them itself: it answers 409, or nginx without ``create_full_put_path``
500); a body the server finds too large (413) is a ``StoreError`` that says so;
an exclusive put is a PUT to a hidden temporary name followed by ``MOVE`` with
``Overwrite: F``, which the server refuses with 412 when the key exists (nginx ignores
``If-None-Match`` on PUT, so that cannot be used); ``delete`` is a DELETE. Names starting
with ``.`` are never listed, so an interrupted exclusive put leaves nothing visible.

A partial (206) answer must name the range asked for in its ``Content-Range`` (more bytes
from the same offset are cut to the range); a ranged read never takes more of a body than
its end, so a server that ignores ranges, or sends a body without end, costs that much.

Errors: 404 is ``ObjectNotFound``; refused or reset connections, timeouts (an answer
that trickles in counts: ``cafs.stores.pace``), short bodies, answers of another range
(or several, or compressed: ``cafs.stores.keepalive``) and 5xx answers are
``StoreUnavailable`` (worth retrying: see ``cafs.sources``);
refused credentials, certificate failures and refused writes are ``StoreError`` (a write
answered 403, by a server that lets these credentials, or anyone, only read, says so
rather than blaming the credentials).
The store retries nothing itself. Messages name the object URL, never a credential.
"""

from __future__ import annotations

import builtins

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from urllib.parse import quote, unquote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, ResponseError, SSLError

from cafs.errors import ListingUnavailable, NoSpaceError, ObjectNotFound, StoreError, StoreUnavailable, UsageError
from cafs.stores.access import RemoteAccess, without_query
from cafs.stores.base import ObjectExists, check_key
from cafs.stores.keepalive import KeepAliveGets
from cafs.stores.pace import Pace, read_body, send_pieces
from cafs.stores.trio_gets import TrioGets

log = logging.getLogger("cafs.stores.http")
_REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
# redirects only: every other failure is left to the caller's retries (cafs.sources)
_FOLLOW_REDIRECTS = urllib3.Retry(total=MAX_REDIRECTS, connect=0, read=0, status=0, other=0,
                                  redirect=MAX_REDIRECTS, raise_on_redirect=True, raise_on_status=False)

DEFAULT_TIMEOUT = 10.0  # per request and per socket operation; cafs.sources adds a deadline
LIST_THREADS = 8
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    data: bytes


class HttpStore:
    def __init__(self, url: str, access: RemoteAccess = RemoteAccess(), *,
                 timeout: float = DEFAULT_TIMEOUT, connections: int = 16) -> None:
        """Raises ``UsageError`` for a URL with a query or fragment (keys are appended
        to its path)."""
        self.url = _encode_path(url).rstrip("/")
        self._base = self.url + "/"
        self._headers = access.headers()
        self._path = urlsplit(self._base).path
        # one TLS context for both clients: the same CAs and client certificate
        context = access.ssl_context() if urlsplit(url).scheme == "https" else None
        self._gets = KeepAliveGets(url, context, timeout)
        self._timeout = timeout
        self._warned_ranges = False
        self._pool = urllib3.PoolManager(
            num_pools=2, maxsize=connections, retries=False,
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout), ssl_context=context)

    def trio_gets(self, timeout: float) -> TrioGets | None:
        """A reader of ranges on the trio loop with this store's address and headers
        (``cafs.stores.trio_gets``); None over https."""
        parts = urlsplit(self._base)
        if parts.scheme != "http":
            return None
        return TrioGets(parts.hostname or "", parts.port or 80, self._path, self._headers, timeout=timeout)

    # -- the Store protocol -------------------------------------------------------

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        where = self._base + check_key(key)
        if length == 0:
            self._expect(self._request("HEAD", where).status, where, (200,))
            return b""
        headers = dict(self._headers)
        ranged = bool(offset) or length is not None
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{end}"
        limit = None if length is None else offset + length  # enough even for a server that ignores Range
        status, data, content_range = self._gets.get(self._path + key, headers, where, limit=limit)
        if status in _REDIRECTS:
            resp = self._request("GET", where, headers=headers, limit=limit)
            status, data, content_range = resp.status, resp.data, resp.headers.get("Content-Range")
        if status == 416:
            raise StoreError(f"{where}: range {offset}+{length} lies past the end of the object: truncated?")
        self._expect(status, where, (200, 206))
        if status == 206:
            data = _asked_part(data, content_range, offset, length, where)
        elif ranged:
            if not self._warned_ranges:
                self._warned_ranges = True
                log.warning("%s ignores Range requests: every read transfers whole objects "
                            "(packs of up to 64 MiB); serve the repository with a server that "
                            "supports ranges", self.url)
            data = data[offset:] if length is None else data[offset:offset + length]
        if length is not None and len(data) != length:
            raise StoreError(f"{where}: wanted {length} bytes at {offset}, got {len(data)}: truncated?")
        return data

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        where = self._base + check_key(key)
        body = memoryview(data)  # sent from the caller's buffer: a pack is not copied
        if not exclusive:
            self._put(where, body)
            return
        parent, _, name = key.rpartition("/")
        tmp = self._base + (parent + "/" if parent else "") + f"{_TMP_PREFIX}{os.urandom(8).hex()}"
        self._put(tmp, body)
        try:
            resp = self._request("MOVE", tmp, headers={**self._headers, "Destination": where, "Overwrite": "F"})
            if resp.status == 412:
                raise ObjectExists(f"{where} exists already")
            self._expect(resp.status, where, (201, 204), writing=True)
        finally:
            try:
                self._request("DELETE", tmp)  # after a MOVE: nothing left to delete
            except StoreError:
                pass  # a hidden name, never listed; costs space, not correctness

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"list prefix {prefix!r} must end with '/'")
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            pending = [pool.submit(self._list_one, prefix)]
            while pending:
                files, dirs = pending.pop().result()
                yield from files
                pending.extend(pool.submit(self._list_one, d) for d in dirs)

    def delete(self, key: str) -> None:
        where = self._base + check_key(key)
        resp = self._request("DELETE", where)
        if resp.status != 404:
            self._expect(resp.status, where, (200, 202, 204), writing=True)

    # -- helpers ------------------------------------------------------------------

    def _request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                 body: memoryview | None = None, limit: int | None = None) -> _Answer:
        """One request, its whole answer (its first ``limit`` bytes, the connection then
        closed) read at ``cafs.stores.pace`` speed; a GET or HEAD follows up to
        ``MAX_REDIRECTS`` redirects (urllib3 drops the credentials when one leads to another
        host), a write follows none."""
        reads = method in ("GET", "HEAD")
        retries = _FOLLOW_REDIRECTS if reads else False
        try:
            sent = dict(headers if headers is not None else self._headers)
            if body is not None:
                sent["Content-Length"] = str(len(body))
            resp = self._pool.request(method, url, headers=sent,
                                      body=None if body is None else send_pieces(body), redirect=reads,
                                      retries=retries, preload_content=False)
            try:
                data = read_body(resp, Pace(self._timeout), limit)  # from the head on: an upload may take long
                if limit is not None and len(data) >= limit:
                    resp.close()  # the rest of the body is left unread: the connection is not reusable
            finally:
                resp.release_conn()
        except MaxRetryError as exc:
            if isinstance(exc.reason, ResponseError):
                raise StoreError(f"{url}: more than {MAX_REDIRECTS} redirects") from None
            raise StoreUnavailable(f"{url}: {method} failed: {_reason(exc)}") from None
        except SSLError as exc:
            raise StoreError(f"{url}: TLS failed: {_reason(exc)}") from None
        except (HTTPError, TimeoutError) as exc:
            raise StoreUnavailable(f"{url}: {method} failed: {_reason(exc)}") from None
        return _Answer(resp.status, resp.headers, data)

    def _expect(self, status: int, url: str, ok: tuple[int, ...], *, writing: bool = False) -> None:
        if status in ok:
            return
        if status == 404:
            raise ObjectNotFound(f"{url}: not found")
        if writing and status == 403:  # reads pass, so the server (or its rules) refuses writes
            raise StoreError(f"{url}: the server refuses writes here ({status}): it serves this repository "
                             "read-only, to anyone or to these credentials")
        if status in (401, 403):
            raise StoreError(f"{url}: access denied ({status}): check the credentials for this server")
        if writing and status in (405, 501):
            raise StoreError(f"{url}: the server does not accept writes (WebDAV PUT/MOVE/DELETE; {status})")
        if status == 507:
            raise NoSpaceError(f"{url}: the server has no space left (507)")
        if status >= 500 or status in (408, 429):
            raise StoreUnavailable(f"{url}: server error {status}")
        raise StoreError(f"{url}: unexpected answer {status}")

    def _put(self, url: str, body: memoryview) -> None:
        resp = self._request("PUT", url, headers=self._headers, body=body)
        if resp.status == 409:  # a parent collection is missing and the server will not make it
            self._make_parents(url)
            resp = self._request("PUT", url, headers=self._headers, body=body)
        elif resp.status == 500 and self._made_missing_parents(url):
            # nginx without create_full_put_path: its rename into the missing directory fails
            resp = self._request("PUT", url, headers=self._headers, body=body)
        if resp.status == 413:
            raise StoreError(f"{url}: the server refuses a body of {len(body)} bytes as too large (413); "
                             "let it take objects of any size (nginx: client_max_body_size 0)")
        self._expect(resp.status, url, (200, 201, 204), writing=True)

    def _make_parents(self, url: str) -> bool:
        """Make the collections missing above ``url`` with MKCOL, deepest first, going up
        while the server answers 409 (its parent is missing too): the repository's own
        directory and those above it as well, for ``init`` of a new URL. Whether any was
        missing. Raises ``StoreError`` when the server will not make one."""
        parent = url[:url.rstrip("/").rfind("/") + 1]
        if urlsplit(parent).path in ("", "/"):
            return False
        resp = self._request("MKCOL", parent)
        if resp.status == 409:
            self._make_parents(parent)
            resp = self._request("MKCOL", parent)
        if resp.status == 405:  # exists already
            return False
        self._expect(resp.status, parent, (201,), writing=True)
        return True

    def _made_missing_parents(self, url: str) -> bool:
        """After a 500 to a PUT: whether a missing parent collection was the cause (and is
        now made), so that the PUT is worth sending again; False for any other failure."""
        try:
            return self._make_parents(url)
        except StoreError:
            return False  # the 500 stands

    def _list_one(self, prefix: str) -> tuple[builtins.list[tuple[str, int]], builtins.list[str]]:
        where = self._base + prefix
        resp = self._request("GET", where, headers={**self._headers, "Accept": "application/json"})
        if resp.status == 404:
            return [], []
        if resp.status in (403, 405):
            raise ListingUnavailable(
                f"{where}: the server gives no directory listing ({resp.status}); enable one (nginx: "
                "autoindex on; autoindex_format json;) or name snapshots as REPO#NAME or REPO#NAME@JID")
        self._expect(resp.status, where, (200,))
        body = resp.data
        try:
            entries = _parse_json_index(body) if body.lstrip()[:1] == b"[" else self._parse_html_index(body, where)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{where}: cannot read the directory listing: {exc}") from None
        files, dirs = [], []
        for name, is_dir, size in entries:
            if name.startswith(".") or "/" in name or not name:
                continue
            if is_dir:
                dirs.append(f"{prefix}{name}/")
            else:
                files.append((f"{prefix}{name}", size))
        return files, dirs

    def _parse_html_index(self, body: bytes, where: str) -> builtins.list[tuple[str, bool, int]]:
        links = _Links()
        links.feed(body.decode("utf-8", "replace"))
        entries = []
        for href in links.hrefs:
            target = urljoin(where, href)
            if not target.startswith(where) or target == where or "?" in href:
                continue
            name = unquote(target[len(where):])
            if name.endswith("/"):
                entries.append((name[:-1], True, 0))
            elif _NAME.fullmatch(name):
                head = self._request("HEAD", target)
                self._expect(head.status, target, (200,))
                entries.append((name, False, int(head.headers.get("Content-Length", 0))))
        return entries


_NAME = re.compile(r"[A-Za-z0-9._-]+")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _asked_part(data: bytes, content_range: str | None, offset: int, length: int | None, where: str) -> bytes:
    """The bytes ``[offset, offset+length)`` of a partial (206) answer whose body is
    ``data``, after checking its ``Content-Range`` says they are the ones asked for: a
    server (or a cache in front of it) that answers another range, or none it names, sends
    bytes that belong elsewhere. Raises ``StoreUnavailable`` for such a broken answer and
    leaves ``StoreError`` for an object shorter than asked to the caller."""
    asked = f"bytes {offset}-{'' if length is None else offset + length - 1}"
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None:
        said = "no Content-Range" if content_range is None else f"Content-Range {content_range[:80]!r}"
        raise StoreUnavailable(f"{where}: asked for {asked}, the server answered 206 with {said}")
    first, last, total = int(match[1]), int(match[2]), match[3]
    if first != offset or last < first:
        raise StoreUnavailable(f"{where}: asked for {asked}, the server answered {match[0]}")
    named = last - first + 1
    if len(data) < (named if length is None else min(named, length)):
        raise StoreUnavailable(f"{where}: the server answered {match[0]} with a body of {len(data)} bytes")
    if length is None:
        if total != str(last + 1):
            raise StoreUnavailable(f"{where}: asked for {asked}, the server answered only {match[0]}")
        return data
    if named < length and total != str(last + 1):
        raise StoreUnavailable(f"{where}: asked for {asked}, the server answered only {match[0]}")
    return data[:length]


def _encode_path(url: str) -> str:
    """``url`` with its path percent-encoded as UTF-8 (``/données/my repo`` becomes
    ``/donn%C3%A9es/my%20repo``; escapes already there are kept), so that every client
    sends one request target: urllib3 encodes a raw path itself, while the keep-alive GETs
    and a MOVE's ``Destination`` header sent it as it was (a space: 400; ``é``: Latin-1
    bytes, another directory on the server)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise UsageError(f"{without_query(url)}?...: an http(s):// repository URL takes no query or fragment")
    path = quote(_LONE_PERCENT.sub("%25", parts.path), safe="/%!$&'()*+,;=:@~")
    return parts._replace(path=path).geturl()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(v for k, v in attrs if k == "href" and v)


def _parse_json_index(body: bytes) -> list[tuple[str, bool, int]]:
    return [(str(e["name"]), e["type"] == "directory", int(e.get("size", 0))) for e in json.loads(body)]


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)

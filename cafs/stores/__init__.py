"""Stores by URL. ``open_store`` is the one place that maps a URL to a store class."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote_to_bytes

from cafs.errors import UsageError
from cafs.stores.access import redact, refuse_userinfo, split_url
from cafs.stores.base import (
    ObjectExists, ObjectWriter, ResidentReads, Store, StreamingWrites, TrioReads, check_key,
)
from cafs.stores.local import LocalStore

__all__ = ["ObjectExists", "ObjectWriter", "ResidentReads", "Store", "StreamingWrites", "TrioReads", "check_key",
           "LocalStore", "open_store"]


def open_store(url: str, *, deadline: float | None = None) -> Store:
    """The store at ``url``. ``deadline`` (seconds) bounds how long a remote store waits
    for one answer: a third of it, at most the store's default, so that ``cafs.sources``
    can still retry within the deadline."""
    if not url:
        raise UsageError("empty repository location")
    parts = split_url(url) if "://" in url else None
    if parts is None or parts.scheme == "":
        return LocalStore(Path(url).absolute())
    refuse_userinfo(url)  # for any scheme: the messages below name the URL
    scheme = parts.scheme
    if scheme == "file":
        return LocalStore(_file_url_path(url, parts.netloc, parts.path))
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise UsageError(f"{redact(url)}: no host in the URL")
        from cafs.stores.access import access_for
        from cafs.stores.http import DEFAULT_TIMEOUT, HttpStore
        return HttpStore(url, access_for(url), timeout=_request_timeout(DEFAULT_TIMEOUT, deadline))
    if scheme == "s3":
        from cafs.stores.aws_config import s3_settings
        from cafs.stores.s3 import DEFAULT_TIMEOUT as S3_TIMEOUT
        from cafs.stores.s3 import S3Store
        return S3Store(url, s3_settings(), timeout=_request_timeout(S3_TIMEOUT, deadline))
    raise UsageError(f"{url}: unknown repository URL scheme {scheme!r}")


def _file_url_path(url: str, host: str, path: str) -> Path:
    """The local path a ``file://`` URL names (RFC 8089): percent-escapes decoded, so
    that ``%23`` names a directory with ``#`` in it, which ``REPO#NAME`` cannot."""
    if host not in ("", "localhost"):
        raise UsageError(f"{url}: a file:// URL names a path on this host, not on {host!r}")
    if not path:
        raise UsageError(f"{url}: a file:// URL needs a path")
    return Path(os.fsdecode(unquote_to_bytes(path)))


def _request_timeout(default: float, deadline: float | None) -> float:
    return default if deadline is None else min(default, max(0.5, deadline / 3))

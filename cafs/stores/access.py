"""How to reach a remote store: credentials and TLS settings for a URL.

Credentials never travel in a repository URL (``https://user:pass@host/...`` is refused):
a URL shows in ``ps``, in ``/proc/mounts``, in logs and in error messages. They come from

1. the environment, for the process at hand: ``CAFS_TOKEN`` (a bearer token),
   ``CAFS_USERNAME`` and ``CAFS_PASSWORD`` (basic auth), ``CAFS_CA_FILE``,
   ``CAFS_CERT_FILE`` and ``CAFS_KEY_FILE`` (a client certificate, mutual TLS);
2. a remotes file, for hosts and mounts started by fstab or systemd: ``$CAFS_REMOTES``,
   else ``~/.config/cafs/remotes.toml`` (users other than root), else
   ``/etc/cafs/remotes.toml``. Each ``[[remote]]`` table names a ``url`` prefix and any of
   ``token``, ``token_file``, ``username``, ``password``, ``password_file``, ``ca_file``,
   ``cert_file``, ``key_file``; the longest prefix matching the repository URL applies,
   where a prefix ends at a ``/`` (``https://h/data`` is for ``https://h/data/...``, not
   for ``https://h/data2`` nor ``https://h.example.org``).
   Keep the file mode 0600: it holds secrets.

The environment overrides the file field by field. ``RemoteAccess`` never shows a
secret in its ``repr``. S3 credentials are the AWS ones (see ``cafs.stores.s3``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, urlsplit

from cafs.errors import UsageError

if TYPE_CHECKING:
    import ssl  # imported where used: a local repository's command need not load TLS

_FILE_FIELDS = {"token", "username", "password", "ca_file", "cert_file", "key_file"}
_ENV = {"token": "CAFS_TOKEN", "username": "CAFS_USERNAME", "password": "CAFS_PASSWORD",
        "ca_file": "CAFS_CA_FILE", "cert_file": "CAFS_CERT_FILE", "key_file": "CAFS_KEY_FILE"}
_SECRETS = {"token", "password"}


@dataclass(frozen=True)
class RemoteAccess:
    token: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __repr__(self) -> str:
        shown = [f"{f.name}={'***' if f.name in _SECRETS else getattr(self, f.name)!r}"
                 for f in fields(self) if getattr(self, f.name) is not None]
        return f"RemoteAccess({', '.join(shown)})"

    def headers(self) -> dict[str, str]:
        """The Authorization header, if any."""
        if self.token:
            return {"Authorization": f"Bearer {self.token}"}
        if self.username is not None:
            import base64
            pair = f"{self.username}:{self.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        return {}


    def ssl_context(self) -> ssl.SSLContext:
        """The TLS settings for HTTPS: the CA file (else the system's CAs) and the client
        certificate, if any. Raises UsageError naming a file that cannot be used."""
        import ssl
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"CA file {self.ca_file}: cannot be used: {_why(exc)}") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"client certificate {self.cert_file} (key {self.key_file or 'in the same file'}): "
                                 f"cannot be used: {_why(exc)}") from None
        return context


def _why(exc: OSError | ssl.SSLError) -> str:
    return str(exc.strerror or exc) if isinstance(exc, OSError) and exc.strerror else str(exc)


def split_url(url: str) -> SplitResult:
    """``urlsplit(url)``, its port checked; a malformed URL (a port out of range or not a
    number, an unclosed IPv6 bracket) is a ``UsageError`` naming it, without any user
    information, not urllib's ValueError."""
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError as exc:
        scheme, sep, rest = url.partition("://")
        shown = f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url
        raise UsageError(f"{shown}: not a valid URL ({exc})") from None
    return parts


def refuse_userinfo(url: str) -> None:
    parts = split_url(url)
    if parts.username is not None or "@" in parts.netloc:
        raise UsageError(
            f"{redact(url)}: credentials in a URL would show in ps, /proc/mounts and logs; "
            "put them in remotes.toml or CAFS_TOKEN / CAFS_USERNAME+CAFS_PASSWORD instead")


def redact(url: str) -> str:
    """``url`` without any user information, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def without_query(url: str) -> str:
    """``url`` as ``redact`` shows it, its query or fragment (a presigned URL's signature,
    a token) cut off, for the message that refuses them."""
    return redact(url.split("?", 1)[0].split("#", 1)[0])


def remotes_file(env: dict[str, str]) -> Path:
    if env.get("CAFS_REMOTES"):
        return Path(env["CAFS_REMOTES"])
    if os.geteuid() != 0 and env.get("HOME"):
        user = Path(env.get("XDG_CONFIG_HOME") or Path(env["HOME"]) / ".config") / "cafs" / "remotes.toml"
        if user.exists():
            return user
    return Path("/etc/cafs/remotes.toml")


def access_for(url: str, env: dict[str, str] | None = None) -> RemoteAccess:
    """The credentials and TLS settings that apply to ``url``."""
    env = dict(os.environ) if env is None else env
    refuse_userinfo(url)
    access = _from_file(url, remotes_file(env))
    overrides = {name: env[var] for name, var in _ENV.items() if env.get(var)}
    return replace(access, **overrides)


def _from_file(url: str, path: Path) -> RemoteAccess:
    import tomllib  # here: only remote repositories read the file

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        return RemoteAccess()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the remotes file: {exc}") from None
    best: dict[str, object] | None = None
    for table in _tables(doc, path):
        prefix = table.get("url")
        if not isinstance(prefix, str):
            raise UsageError(f"{path}: every [[remote]] needs a url")
        if _covers(prefix, url) and (best is None or len(prefix) > len(str(best["url"]))):
            best = table
    if best is None:
        return RemoteAccess()
    values: dict[str, str] = {}
    for key, value in best.items():
        if key == "url":
            continue
        if not isinstance(value, str):
            raise UsageError(f"{path}: remote {best['url']}: {key} must be a string")
        if key in ("token_file", "password_file"):
            values[key.removesuffix("_file")] = _read_secret(Path(value), path)
        elif key in _FILE_FIELDS:
            values[key] = value
        else:
            raise UsageError(f"{path}: remote {best['url']}: unknown setting {key!r}")
    return RemoteAccess(**values)


def _covers(prefix: str, url: str) -> bool:
    """Whether a remote's ``url`` applies to the repository ``url``: the same URL, or one
    below it (``https://h/data`` covers ``https://h/data/repo``, never ``https://h/data2``,
    ``https://h.example.org`` or ``https://h:4430``: a token goes to its own server only)."""
    base = prefix.rstrip("/")
    return url.rstrip("/") == base or url.startswith(base + "/")


def _tables(doc: dict[str, object], path: Path) -> list[dict[str, object]]:
    remotes = doc.get("remote", [])
    if not isinstance(remotes, list) or not all(isinstance(t, dict) for t in remotes):
        raise UsageError(f"{path}: expected [[remote]] tables")
    return remotes


def _read_secret(secret: Path, path: Path) -> str:
    try:
        return secret.read_text().strip()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {secret}: {exc.strerror}") from None

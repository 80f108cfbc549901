"""Temporary AWS credentials from where the host runs, refreshed before they expire:
an ECS container's credentials endpoint, or the EC2 instance metadata service (IMDSv2).
This is how a training host on AWS usually gets its rights (an instance profile or a
task role), with no key in any file.

Contract:

- ``instance_credentials(env)`` returns a ``RefreshingCredentials`` or None. ECS first,
  when ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` or ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI``
  is set (relative to ``http://169.254.170.2``), sending ``AWS_CONTAINER_AUTHORIZATION_TOKEN``
  (or the contents of ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE``) as ``Authorization``;
  an endpoint that is named but does not answer is an error. Else IMDSv2 at
  ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` (default ``http://169.254.169.254``) unless
  ``AWS_EC2_METADATA_DISABLED=true``: a session token (``PUT /latest/api/token``), the
  role (``/latest/meta-data/iam/security-credentials/``), its credentials. A host without
  the service answers nothing within ``CONNECT_TIMEOUT``: then None, and requests go
  unsigned as before.
- ``RefreshingCredentials.current()`` returns credentials valid for at least
  ``REFRESH_MARGIN`` seconds more, fetching new ones when needed (one thread fetches, the
  others wait). If a refresh fails while the old credentials are still valid, they are
  used; once they have expired, ``StoreUnavailable`` names the source.
- Secrets never appear in messages or ``repr``; ``secrets()`` lists every secret handed
  out so far, for callers that scrub messages.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

import urllib3

from cafs.errors import StoreUnavailable, UsageError
from cafs.stores.sigv4 import Credentials

REFRESH_MARGIN = 300.0  # seconds of validity below which credentials are fetched again
CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 3.0
IMDS_ENDPOINT = "http://169.254.169.254"
ECS_ENDPOINT = "http://169.254.170.2"
TOKEN_TTL = 21600


class CredentialSource(Protocol):
    def credentials(self) -> tuple[Credentials, float]:
        """Fresh credentials and the ``time.time()`` they expire at; raises
        ``StoreUnavailable`` naming the source when it cannot give them."""
        ...


class RefreshingCredentials:
    def __init__(self, fetch: CredentialSource, source: str) -> None:
        self._fetch = fetch
        self.source = source
        self._lock = threading.Lock()
        self._creds: Credentials | None = None
        self._expires = 0.0  # time.time() of expiry
        self._secrets: set[str] = set()

    def __repr__(self) -> str:
        return f"RefreshingCredentials({self.source})"

    def current(self) -> Credentials:
        with self._lock:
            now = time.time()
            if self._creds is None or self._expires - now < REFRESH_MARGIN:
                try:
                    self._creds, self._expires = self._fetch.credentials()
                    self._secrets.update(self._creds.secrets())
                except StoreUnavailable:
                    if self._creds is None or self._expires <= now:
                        raise
                    # the old ones still hold: use them and try again on the next request
            return self._creds

    def fetched(self) -> RefreshingCredentials:
        """Itself, once it has fetched credentials: a source that names itself but gives
        none is a UsageError when the store is opened, not a late "access denied"."""
        try:
            self.current()
        except StoreUnavailable as exc:
            raise UsageError(f"AWS credentials: {exc}") from None
        return self

    def secrets(self) -> tuple[str, ...]:
        return tuple(self._secrets)


class HttpCredentialSource:
    """One way of fetching credentials: ``credentials()`` -> (credentials, expiry time)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._http = urllib3.PoolManager(
            retries=False, timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT))

    def _send(self, method: str, url: str, headers: Mapping[str, str],
              body: bytes | None = None) -> urllib3.BaseHTTPResponse:
        try:
            return self._http.request(method, url, headers=dict(headers), body=body, redirect=False)
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"{self.what}: {method} {url} failed: {getattr(exc, 'reason', None) or exc}") from None

    def _request(self, method: str, url: str, headers: Mapping[str, str]) -> bytes:
        resp = self._send(method, url, headers)
        if resp.status != 200:
            raise StoreUnavailable(f"{self.what}: {method} {url} answered {resp.status}")
        return bytes(resp.data)

    def credentials(self) -> tuple[Credentials, float]:
        raise NotImplementedError

    def _parse(self, body: bytes) -> tuple[Credentials, float]:
        try:
            doc = json.loads(body)
            creds = Credentials(doc["AccessKeyId"], doc["SecretAccessKey"], doc.get("Token") or None)
            expires = parse_expiry(doc["Expiration"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StoreUnavailable(f"{self.what}: the credentials document is not what AWS sends") from None
        return creds, expires


def parse_expiry(text: str) -> float:
    """``time.time()`` of an ISO 8601 expiry as AWS writes it (``2026-11-23T22:00:00Z``);
    raises ValueError."""
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"expiry {text!r} has no time zone")
    return when.timestamp()


class _Imds(HttpCredentialSource):
    def __init__(self, endpoint: str) -> None:
        super().__init__(f"the EC2 instance metadata service at {endpoint}")
        self._base = endpoint.rstrip("/")

    def credentials(self) -> tuple[Credentials, float]:
        token = self._request("PUT", self._base + "/latest/api/token",
                              {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}).decode()
        auth = {"X-aws-ec2-metadata-token": token}
        roles = self._request("GET", self._base + "/latest/meta-data/iam/security-credentials/", auth)
        role = roles.decode().strip().splitlines()[0] if roles.strip() else ""
        if not role or "/" in role:
            raise StoreUnavailable(f"{self.what}: the instance has no IAM role")
        return self._parse(self._request("GET", self._base + f"/latest/meta-data/iam/security-credentials/{role}",
                                         auth))


class _Ecs(HttpCredentialSource):
    def __init__(self, url: str, token: str | None) -> None:
        super().__init__(f"the container credentials endpoint {url}")
        self._url = url
        self._token = token

    def credentials(self) -> tuple[Credentials, float]:
        headers = {"Authorization": self._token} if self._token else {}
        return self._parse(self._request("GET", self._url, headers))


def instance_credentials(env: Mapping[str, str]) -> RefreshingCredentials | None:
    """Credentials from the container or the instance, or None (see the module)."""
    full = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    relative = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if full or relative:
        url = full or ECS_ENDPOINT + (relative or "")
        token = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
        token_file = env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        if not token and token_file:
            try:
                with open(token_file, encoding="utf-8") as f:
                    token = f.read().strip()
            except OSError as exc:
                raise UsageError(f"AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {token_file}: {exc.strerror}") from None
        return RefreshingCredentials(_Ecs(url, token), "the container credentials endpoint").fetched()
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return None
    endpoint = env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or IMDS_ENDPOINT
    imds = RefreshingCredentials(_Imds(endpoint), "the EC2 instance metadata service")
    try:
        imds.current()
    except StoreUnavailable:
        return None  # not on EC2, or no role: unsigned requests, as without any credentials
    return imds

"""AWS Signature Version 4 for S3 requests (header-based ``Authorization``), as pure
functions: no I/O, no clock, no environment.

The algorithm (AWS's "Signature Version 4 signing process" and the S3 API reference's
"Authenticating requests: using the Authorization header"):

1. canonical request: ``METHOD\\nPATH\\nQUERY\\nHEADERS\\n\\nSIGNED\\nPAYLOAD_HASH``, where
   PATH is the URI-encoded path as sent (S3 does not encode it twice), QUERY the
   URI-encoded ``name=value`` pairs sorted by name (a valueless parameter is ``name=``),
   HEADERS every signed header as ``lowercase-name:trimmed value`` sorted by name, SIGNED
   their names joined by ``;``;
2. string to sign: ``AWS4-HMAC-SHA256\\nAMZ_DATE\\nSCOPE\\nhex(sha256(canonical request))``
   with SCOPE ``YYYYMMDD/REGION/SERVICE/aws4_request``;
3. signing key: HMAC-SHA256 chained over ``"AWS4" + secret``, the date, the region, the
   service and ``aws4_request``;
4. ``Authorization: AWS4-HMAC-SHA256 Credential=KEYID/SCOPE, SignedHeaders=SIGNED,
   Signature=hex(hmac(signing key, string to sign))``.

The payload hash is sent as ``x-amz-content-sha256`` and signed. The caller chooses it:
the hex SHA-256 of the body, or ``UNSIGNED-PAYLOAD``, which S3 accepts over HTTPS only
(TLS then protects the body; cafs verifies every object's bytes by BLAKE3 anyway).
``cafs.stores.s3`` hashes bodies sent over plain ``http://`` (MinIO, moto, a lab Ceph)
and sends ``UNSIGNED-PAYLOAD`` over HTTPS, saving a SHA-256 pass over every pack.

Checked against the worked examples of the S3 documentation (tests/test_s3_store.py),
independently of any server. ``Credentials`` never shows its fields in ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


@dataclass(frozen=True)
class Credentials:
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # what a credential helper or a metadata service printed: a number where a string
        # belongs would fail only when a request is signed, as an AttributeError
        for value in (self.access_key_id, self.secret_access_key, self.session_token):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"a credential is a {type(value).__name__}, not a string")

    def __repr__(self) -> str:
        return "Credentials(***)"

    def secrets(self) -> tuple[str, ...]:
        """Every string that must never show in a message."""
        return tuple(s for s in (self.access_key_id, self.secret_access_key, self.session_token) if s)


def amz_date(when: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ`` in UTC, the form of ``x-amz-date``."""
    return when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def uri_encode(text: str, *, keep_slash: bool = False) -> str:
    """AWS's UriEncode: every byte but ``A-Za-z0-9-_.~`` as ``%XX`` (upper case) of its
    UTF-8 encoding; ``/`` kept for paths."""
    return quote(text, safe="/~" if keep_slash else "~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """The header block (each line ending in ``\\n``) and the signed header names."""
    merged: dict[str, list[str]] = {}
    for name, value in headers.items():
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    block = "".join(f"{n}:{','.join(merged[n])}\n" for n in names)
    return block, ";".join(names)


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str],
                      payload_hash: str) -> tuple[str, str]:
    """The canonical request and its signed header names. ``path`` is the encoded path
    exactly as sent; ``query`` is already canonical (``canonical_query``)."""
    block, signed = canonical_headers(headers)
    return "\n".join([method, path or "/", query, block, signed, payload_hash]), signed


def credential_scope(date: str, region: str, service: str) -> str:
    return f"{date[:8]}/{region}/{service}/aws4_request"


def string_to_sign(date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, date, scope, hashlib.sha256(canonical.encode()).hexdigest()])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(key: bytes, to_sign: str) -> str:
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def sign(method: str, path: str, query: str, headers: Mapping[str, str], payload_hash: str,
         credentials: Credentials, *, region: str, date: str, service: str = "s3") -> dict[str, str]:
    """``headers`` (which must hold ``host``) plus ``x-amz-date``, ``x-amz-content-sha256``,
    ``x-amz-security-token`` (with a session token) and ``Authorization``: every header
    of the request, all of them signed. ``date`` is ``amz_date(now)``."""
    out = {k.lower(): v for k, v in headers.items()}
    if "host" not in out:
        raise ValueError("a signed request needs a host header")
    out["x-amz-date"] = date
    out["x-amz-content-sha256"] = payload_hash
    if credentials.session_token:
        out["x-amz-security-token"] = credentials.session_token
    canonical, signed = canonical_request(method, path, query, out, payload_hash)
    scope = credential_scope(date, region, service)
    sig = signature(signing_key(credentials.secret_access_key, date, region, service),
                    string_to_sign(date, scope, canonical))
    out["authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
                            f"SignedHeaders={signed}, Signature={sig}")
    return out

"""A store in an S3 bucket (``s3://BUCKET/PREFIX`` URLs): AWS S3, MinIO, Ceph RGW and
other servers of the S3 protocol, spoken directly over urllib3 with SigV4 signatures
(``cafs.stores.sigv4``). No AWS SDK: botocore alone costs about 0.3 s of import time on
every command and mount, and cafs needs five requests of the protocol.

Objects live at ``PREFIX/KEY`` in the bucket (the prefix may be empty). Settings come the
usual AWS way (``cafs.stores.aws_config``): ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or ``~/.aws/credentials`` and
``~/.aws/config`` with ``AWS_PROFILE``; ``AWS_REGION`` (default ``us-east-1``);
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for another server; ``AWS_CA_BUNDLE`` or
``CAFS_CA_FILE``. Without any credentials, requests go unsigned (public buckets).

Addressing: with an explicit endpoint, path-style ``ENDPOINT/BUCKET/PREFIX/KEY`` (what
MinIO and Ceph expect; ``addressing_style = virtual`` in the profile's ``s3`` block puts
the bucket in the host name instead); on AWS, virtual-hosted style
``https://BUCKET.s3.REGION.amazonaws.com/PREFIX/KEY``, except for bucket names with dots
or capitals (a dotted name breaks the TLS wildcard certificate), which go path-style to
``https://s3.REGION.amazonaws.com/BUCKET/...``.

Operations:

- ``get``: GET with ``Range: bytes=A-B`` (a HEAD for zero bytes).
- ``put``: one PUT up to ``multipart_threshold`` (16 MiB by default); above it a multipart
  upload (CreateMultipartUpload, UploadPart in ``part_size`` parts, ``part_threads`` at a
  time, CompleteMultipartUpload; AbortMultipartUpload on any failure, best effort). S3
  makes an object visible whole or not at all either way. An exclusive put sends
  ``If-None-Match: *`` (S3 conditional writes: AWS since August 2024, recent MinIO and
  Ceph releases) on the PUT, or on CompleteMultipartUpload; the server answers 412 when
  the key exists. A server that ignores the header silently replaces the object; cafs
  relies on exclusive puts only for a new repository's config and for ref journal
  entries, which a lock serializes as well.
- ``list``: ListObjectsV2 pages of up to 1000 keys, following continuation tokens. Keys
  that are not valid store keys below the prefix (folder markers, odd names written by
  other tools) are skipped. A page's XML is bounded (``MAX_XML``) and may not carry a
  DOCTYPE, so no entity tricks reach the parser.
- ``delete``: DELETE; a missing key is fine.
- ``remove_temporaries`` (``stores.base.Temporaries``, for gc): the multipart uploads
  under the prefix that a writer killed mid-pack (``kill -9``, a lost host) never
  completed nor aborted, which S3 keeps, and bills, until they are aborted:
  ListMultipartUploads, ListParts for their size, AbortMultipartUpload for each begun
  more than ``older_than`` seconds ago by the server's clock (its ``Date`` header, so a
  host with a wrong clock spares a live upload too). A listing of uploads the credentials
  may not make (403) removes nothing.

Payload hashes: ``UNSIGNED-PAYLOAD`` over HTTPS (TLS protects the body, and cafs checks
every object by BLAKE3), the body's SHA-256 over plain HTTP, where S3 servers require it.

Errors: a missing key (404, ``NoSuchKey``) is ``ObjectNotFound``; refused or reset
connections, timeouts (an answer that trickles in counts: ``cafs.stores.pace``), short bodies, 5xx (``SlowDown``, ``InternalError``, ...), 408,
429 and S3's ``RequestTimeout`` are ``StoreUnavailable`` (worth retrying: see
``cafs.sources``); a full MinIO disk (507, ``XMinioStorageFull``) or an exhausted Ceph
quota (``QuotaExceeded``) is ``NoSpaceError``; everything else (access denied, a bad
signature, a missing bucket, the wrong region, a range past the end, a TLS failure) is
``StoreError``. The store retries nothing itself. Messages name ``s3://BUCKET/KEY`` and
where the credentials came from, never a key id, secret or token.

Thread-safe: requests share one urllib3 connection pool (``connections`` sockets); the
store keeps no other mutable state.

Caveats: credentials from the environment or files are read once, when the store is
opened (temporary ones expire with their token; restart the command); those from an EC2
instance role, an ECS task role, a ``credential_process`` or a web identity are refreshed
before they expire (see ``cafs.stores.aws_instance`` and ``cafs.stores.aws_external``).
No SSO, and no roles assumed from another profile (``source_profile``). A 200 answer to
CompleteMultipartUpload that carries an ``<Error>`` (S3 does this) is treated as that
error.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_plus, urlsplit

import urllib3
from urllib3.exceptions import HTTPError, SSLError

from cafs.errors import ListingUnavailable, NoSpaceError, ObjectNotFound, StoreError, StoreUnavailable, UsageError
from cafs.stores.access import RemoteAccess, redact, refuse_userinfo, without_query
from cafs.stores.aws_config import S3Settings
from cafs.stores.aws_instance import RefreshingCredentials
from cafs.stores import awsxml
from cafs.stores.base import ObjectExists, check_key
from cafs.stores.pace import Pace, read_body, send_pieces
from cafs.stores.sigv4 import (
    EMPTY_SHA256,
    UNSIGNED_PAYLOAD,
    amz_date,
    canonical_query,
    sign,
    uri_encode,
)

log = logging.getLogger("cafs.stores.s3")

DEFAULT_TIMEOUT = 10.0  # per request and per socket operation; cafs.sources adds a deadline
MULTIPART_THRESHOLD = 16 * 2**20
PART_SIZE = 16 * 2**20
MIN_PART_SIZE = 5 * 2**20  # S3's smallest part but the last
MAX_PARTS = 10_000
PART_THREADS = 4
MAX_XML = 16 * 2**20  # an answer that is not object bytes
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")
_DNS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_RETRYABLE_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                    "OperationAborted", "ConditionalRequestConflict", "NoSuchUpload"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
               "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled"}
_NO_SPACE_CODES = {"XMinioStorageFull", "StorageFull", "QuotaExceeded", "XMinioAdminBucketQuotaExceeded"}


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    data: bytes


class S3Store:
    def __init__(self, url: str, settings: S3Settings | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, connections: int = 16,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = PART_SIZE,
                 part_threads: int = PART_THREADS) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE}")
        settings = settings or S3Settings()
        self.bucket, self.prefix = _parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._settings = settings
        self._creds = settings.credentials
        self._timeout = timeout
        self._threshold = max(multipart_threshold, 0)
        self._part_size = part_size
        self._part_threads = max(part_threads, 1)
        endpoint, host_bucket = _endpoint(self.bucket, settings)
        self._endpoint = endpoint
        parts = urlsplit(endpoint)
        self._host = parts.netloc
        self._origin = f"{parts.scheme}://{parts.netloc}"
        # the endpoint's own path, then /BUCKET unless the host names the bucket
        self._root = parts.path.rstrip("/") + ("" if host_bucket else "/" + uri_encode(self.bucket))
        self._sign_payload = parts.scheme == "http"
        # made now, as for an HTTP store: a CA file that cannot be read is a usage error
        # naming it, not a "TLS failed: No such file or directory" on the first request
        context = RemoteAccess(ca_file=settings.ca_file).ssl_context() if parts.scheme == "https" else None
        self._pool = urllib3.PoolManager(
            num_pools=2, maxsize=connections, retries=False,
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout), ssl_context=context)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self._endpoint!r}, region={self._settings.region!r})"

    # -- the Store protocol -------------------------------------------------------

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_key(key)
        if length == 0:
            return self._past_end(key, offset, length)
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            headers["range"] = f"bytes={offset}-{end}"
        ans = self._call("GET", key, headers=headers, limit=None)
        if ans.status == 416:
            return self._past_end(key, offset, length)
        self._expect(ans, key, (200, 206))
        data = ans.data
        if ans.status == 200 and (offset or length is not None):
            data = data[offset:] if length is None else data[offset:offset + length]
        if length is not None and len(data) != length:
            raise StoreError(f"{self._where(key)}: range {offset}+{length} lies past the end of the "
                             f"object (got {len(data)} bytes): truncated?")
        return data

    def put(self, key: str, data: bytes | bytearray | memoryview, *, exclusive: bool = False) -> None:
        check_key(key)
        view = memoryview(data).cast("B")
        if len(view) <= self._threshold:
            headers = {"if-none-match": "*"} if exclusive else {}
            ans = self._call("PUT", key, headers=headers, body=view)
            self._expect(ans, key, (200,), exclusive=exclusive)
        else:
            self._put_multipart(key, view, exclusive)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"list prefix {prefix!r} must end with '/'")
        full = self.prefix + prefix
        token: str | None = None
        seen: set[str] = set()
        while True:
            query = [("list-type", "2"), ("prefix", full), ("encoding-type", "url")]
            if token is not None:
                query.append(("continuation-token", token))
            ans = self._call("GET", None, query=query)
            try:
                self._expect(ans, None, (200,))
            except StoreUnavailable:
                raise
            except StoreError as exc:
                if ans.status != 403:
                    raise
                # readable objects without s3:ListBucket (a public bucket): named snapshots
                # are still found through refs/NAME/latest
                raise ListingUnavailable(f"{exc}; listing is refused, objects can still be read "
                                         "by name (REPO#NAME, REPO#NAME@JID)") from None
            root = self._xml(ans, None, "ListBucketResult")
            for item in awsxml.children(root, "Contents"):
                name = unquote_plus(awsxml.text(item, "Key"))
                if not name.startswith(full):
                    continue
                rel = name[len(self.prefix):]
                try:
                    check_key(rel)
                    size = int(awsxml.text(item, "Size"))
                except (StoreError, ValueError):
                    continue  # not ours: a folder marker, an odd name, a bad size
                yield rel, size
            if awsxml.text(root, "IsTruncated").lower() != "true":
                return
            token = awsxml.text(root, "NextContinuationToken")
            if not token or token in seen:
                raise StoreError(f"{self.url}/{prefix}: the listing does not advance (continuation token)")
            seen.add(token)

    def delete(self, key: str) -> None:
        check_key(key)
        ans = self._call("DELETE", key)
        if ans.status == 404 and _error_code(ans) in ("NoSuchKey", ""):
            return
        self._expect(ans, key, (200, 204))

    def remove_temporaries(self, prefix: str, older_than: float) -> tuple[int, int]:
        """Abort the multipart uploads under ``prefix`` begun more than ``older_than``
        seconds ago (see the module); returns (uploads, bytes of their parts)."""
        if prefix and not prefix.endswith("/"):
            raise StoreError(f"prefix {prefix!r} must end with '/'")
        removed = size = 0
        key_marker = upload_marker = ""
        seen: set[tuple[str, str]] = set()
        while True:
            query = [("uploads", ""), ("prefix", self.prefix + prefix), ("encoding-type", "url")]
            if key_marker or upload_marker:
                query += [("key-marker", key_marker), ("upload-id-marker", upload_marker)]
            ans = self._call("GET", None, query=query)
            if ans.status == 403 and _error_code(ans) in ("AccessDenied", ""):
                log.warning("%s: unfinished uploads cannot be listed (%s); parts of interrupted "
                            "uploads stay until a lifecycle rule removes them", self.url, ans.status)
                return removed, size
            self._expect(ans, None, (200,))
            root = self._xml(ans, None, "ListMultipartUploadsResult")
            cutoff = _server_time(ans) - older_than
            for item in awsxml.children(root, "Upload"):
                name, upload_id = unquote_plus(awsxml.text(item, "Key")), awsxml.text(item, "UploadId")
                if not name.startswith(self.prefix) or not upload_id:
                    continue
                key = name[len(self.prefix):]
                try:
                    check_key(key)
                    begun = datetime.fromisoformat(awsxml.text(item, "Initiated")).timestamp()
                except (StoreError, ValueError):
                    continue  # not ours, or no time to judge its age by
                if begun >= cutoff:
                    continue  # perhaps a live writer's
                parts = self._upload_size(key, upload_id)
                abort = self._call("DELETE", key, query=[("uploadId", upload_id)])
                if abort.status == 404:
                    continue  # finished or aborted meanwhile
                self._expect(abort, key, (200, 204))
                removed, size = removed + 1, size + parts
            if awsxml.text(root, "IsTruncated").lower() != "true":
                return removed, size
            next_key = unquote_plus(awsxml.text(root, "NextKeyMarker"))
            next_upload = awsxml.text(root, "NextUploadIdMarker")
            if not next_key or (next_key, next_upload) in seen:
                raise StoreError(f"{self.url}/{prefix}: the listing of uploads does not advance")
            seen.add((next_key, next_upload))
            key_marker, upload_marker = next_key, next_upload

    def _upload_size(self, key: str, upload_id: str) -> int:
        """The bytes of the parts an unfinished upload holds, as far as it can tell: the
        size is for the report only, so an answer it cannot read ends the count."""
        size = 0
        marker = ""
        for _page in range(MAX_PARTS // 1000 + 1):
            query = [("uploadId", upload_id)] + ([("part-number-marker", marker)] if marker else [])
            ans = self._call("GET", key, query=query)
            try:
                root = awsxml.parse_xml(ans.data)  # not checked by name: moto says ListPartsResponse
            except ValueError:
                return size
            if ans.status != 200:
                return size
            for part in awsxml.children(root, "Part"):
                try:
                    size += int(awsxml.text(part, "Size"))
                except ValueError:
                    pass
            if awsxml.text(root, "IsTruncated").lower() != "true":
                break
            marker = awsxml.text(root, "NextPartNumberMarker")
        return size

    # -- multipart ---------------------------------------------------------------

    def _put_multipart(self, key: str, view: memoryview, exclusive: bool) -> None:
        ans = self._call("POST", key, query=[("uploads", "")])
        self._expect(ans, key, (200,))
        upload_id = awsxml.text(self._xml(ans, key, "InitiateMultipartUploadResult"), "UploadId")
        if not upload_id:
            raise StoreError(f"{self._where(key)}: CreateMultipartUpload returned no UploadId")
        try:
            part = max(self._part_size, -(-len(view) // MAX_PARTS))
            pieces = [view[i:i + part] for i in range(0, len(view), part)]
            with ThreadPoolExecutor(min(self._part_threads, len(pieces))) as pool:
                etags = list(pool.map(lambda n: self._put_part(key, upload_id, n + 1, pieces[n]),
                                      range(len(pieces))))
            body = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{_xml_escape(etag)}</ETag></Part>"
                           for n, etag in enumerate(etags, 1))
            doc = f'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{body}</CompleteMultipartUpload>'
            headers = {"content-type": "application/xml"}
            if exclusive:
                headers["if-none-match"] = "*"
            ans = self._call("POST", key, query=[("uploadId", upload_id)], headers=headers,
                             body=memoryview(doc.encode()))
            self._expect(ans, key, (200,), exclusive=exclusive)
            self._xml(ans, key, "CompleteMultipartUploadResult")  # a 200 may still carry an <Error>
        except BaseException:
            try:
                self._call("DELETE", key, query=[("uploadId", upload_id)])
            except StoreError:
                pass  # gc aborts it later (remove_temporaries), or a lifecycle rule does
            raise

    def _put_part(self, key: str, upload_id: str, number: int, piece: memoryview) -> str:
        ans = self._call("PUT", key, query=[("partNumber", str(number)), ("uploadId", upload_id)], body=piece)
        self._expect(ans, key, (200,))
        etag = ans.headers.get("ETag")
        if not etag:
            raise StoreError(f"{self._where(key)}: UploadPart {number} returned no ETag")
        return etag

    # -- requests -----------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}" if key is not None else self.url

    def _call(self, method: str, key: str | None, *, query: builtins.list[tuple[str, str]] | None = None,
              headers: dict[str, str] | None = None, body: memoryview | None = None,
              limit: int | None = MAX_XML) -> _Answer:
        """One request, its whole answer read (at most ``limit`` bytes of it)."""
        path = self._root + ("/" + uri_encode(self.prefix + key, keep_slash=True) if key is not None else "")
        path = path or "/"
        qs = canonical_query(query or [])
        hdrs = {"host": self._host, **(headers or {})}
        if self._creds is not None:
            if body is None or not len(body):
                payload = EMPTY_SHA256
            elif self._sign_payload:
                payload = hashlib.sha256(body).hexdigest()
            else:
                payload = UNSIGNED_PAYLOAD
            creds = self._creds.current() if isinstance(self._creds, RefreshingCredentials) else self._creds
            hdrs = sign(method, path, qs, hdrs, payload, creds, region=self._settings.region,
                        date=amz_date(datetime.now(UTC)))
        url = self._origin + path + (f"?{qs}" if qs else "")
        where = self._where(key)
        try:
            # urllib3 sends any buffer as it is (its annotation says bytes): no copy of parts
            if body is not None:
                hdrs = {**hdrs, "content-length": str(len(body))}
            resp = self._pool.request(method, url, headers=hdrs, body=None if body is None else send_pieces(body),
                                      redirect=False, preload_content=False, decode_content=False)
            try:
                # paced from the head on: an upload before it may take long
                data = read_body(resp, Pace(self._timeout), limit + 1 if limit is not None else None,
                                 decode_content=False)
                if limit is not None and len(data) > limit:
                    resp.close()  # unread bytes: the connection is not reusable
                    raise StoreError(f"{where}: {method} answer larger than {limit} bytes")
            finally:
                resp.release_conn()
        except SSLError as exc:
            raise StoreError(f"{where}: TLS failed: {self._scrub(_reason(exc))}") from None
        except (HTTPError, TimeoutError) as exc:
            raise StoreUnavailable(f"{where}: {method} failed: {self._scrub(_reason(exc))}") from None
        return _Answer(resp.status, resp.headers, data)

    def _past_end(self, key: str, offset: int, length: int | None) -> bytes:
        """For zero bytes, or a range the server found unsatisfiable (416): ``b""`` if
        the object exists and ``offset`` is at most its size (exactly it without a
        ``length``: S3 refuses the range ``bytes=SIZE-``), else the right error."""
        ans = self._call("HEAD", key)
        self._expect(ans, key, (200,))
        try:
            size = int(ans.headers["Content-Length"])
        except (KeyError, ValueError):
            raise StoreError(f"{self._where(key)}: HEAD gave no size") from None
        if offset > size or (length is None and offset != size) or (length and offset + length > size):
            raise StoreError(f"{self._where(key)}: range {offset}+{length} lies past the end of the "
                             f"object ({size} bytes): truncated?")
        return b""

    def _expect(self, ans: _Answer, key: str | None, ok: tuple[int, ...], *, exclusive: bool = False) -> None:
        if ans.status in ok:
            return
        code = _error_code(ans)
        where = self._where(key)
        detail = f"{ans.status} {code}".strip()
        message = self._scrub(_error_message(ans))
        said = f": {message}" if message else ""
        if exclusive and ans.status == 412:
            raise ObjectExists(f"{where} exists already")
        if code == "NoSuchBucket":
            raise StoreError(f"{where}: bucket {self.bucket!r} does not exist at {self._endpoint} ({detail})")
        if ans.status == 404 and key is not None and code in ("NoSuchKey", ""):
            raise ObjectNotFound(f"{where}: not found")
        if ans.status == 507 or code in _NO_SPACE_CODES:
            raise NoSpaceError(f"{where}: the store has no space left ({detail}{said})")
        if ans.status >= 500 or ans.status in (408, 429) or code in _RETRYABLE_CODES:
            raise StoreUnavailable(f"{where}: server error ({detail}{said})")
        if ans.status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                                                  "IllegalLocationConstraintException"):
            region = ans.headers.get("x-amz-bucket-region")
            hint = f"set AWS_REGION={region}" if region else "check AWS_REGION and the endpoint"
            raise StoreError(f"{where}: bucket {self.bucket!r} is not reachable as configured "
                             f"(region {self._settings.region}; {detail}{said}): {hint}")
        if code == "RequestTimeTooSkewed":
            raise StoreError(f"{where}: the server refused our clock ({detail}): check this host's time")
        if ans.status in (401, 403) or code in _AUTH_CODES:
            if self._creds is None:
                whose = ("no AWS credentials were found, so the request went unsigned "
                         "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
            else:
                whose = f"credentials from {self._settings.credentials_from or 'the caller'}"
            raise StoreError(f"{where}: access denied to bucket {self.bucket!r} ({detail}{said}); {whose}")
        raise StoreError(f"{where}: unexpected answer ({detail}{said})")

    def _xml(self, ans: _Answer, key: str | None, expected: str) -> ET.Element:
        try:
            root = awsxml.parse_xml(ans.data)
        except ValueError as exc:
            raise StoreError(f"{self._where(key)}: cannot read the answer ({exc})") from None
        tag = awsxml.tag(root)
        if tag == "Error":  # S3 may answer 200 and fail later in the body
            code, message = awsxml.text(root, "Code"), self._scrub(" ".join(awsxml.text(root, "Message").split()))
            error = StoreUnavailable if code in _RETRYABLE_CODES or not code else StoreError
            raise error(f"{self._where(key)}: failed after answering 200 ({code}: {message})")
        if tag != expected:
            raise StoreError(f"{self._where(key)}: expected {expected}, got {tag}")
        return root

    def _scrub(self, text: str) -> str:
        if self._creds is not None:
            for secret in self._creds.secrets():
                text = text.replace(secret, "***")
        return text[:300]


def _parse_url(url: str) -> tuple[str, str]:
    refuse_userinfo(url)
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise UsageError(f"{redact(url)}: not an s3:// URL")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise UsageError(f"{without_query(url)}?...: an s3:// URL takes no query or fragment")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket):
        raise UsageError(f"{url}: {bucket!r} is not a bucket name")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            check_key(prefix)
        except StoreError:
            raise UsageError(f"{url}: the prefix must be '/'-separated names of [A-Za-z0-9._-]") from None
        prefix += "/"
    return bucket, prefix


def _endpoint(bucket: str, settings: S3Settings) -> tuple[str, bool]:
    """The base URL of requests, and whether it names the bucket in its host."""
    if settings.endpoint_url:
        ep = settings.endpoint_url.rstrip("/")
        parts = urlsplit(ep)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{redact(ep)}: an S3 endpoint must be an http:// or https:// URL")
        refuse_userinfo(ep)
        if settings.addressing_style == "virtual":
            return f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}", True
        return ep, False
    region = settings.region
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    if settings.addressing_style == "path" or not _DNS_BUCKET.fullmatch(bucket):
        return f"https://s3.{region}.{domain}", False
    return f"https://{bucket}.s3.{region}.{domain}", True


def _server_time(ans: _Answer) -> float:
    """The server's clock at its answer (its ``Date`` header), else this host's."""
    try:
        return parsedate_to_datetime(ans.headers.get("Date", "")).timestamp()
    except (TypeError, ValueError, IndexError):
        return datetime.now(UTC).timestamp()


def _error_code(ans: _Answer) -> str:
    code = awsxml.error_fields(ans.data)[0]
    if not code and ans.status >= 300:
        code = ans.headers.get("x-minio-error-code", "")
    return code


def _error_message(ans: _Answer) -> str:
    return " ".join(awsxml.error_fields(ans.data)[1].split())


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc)

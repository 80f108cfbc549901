"""The S3 store (``cafs.stores.s3``), its signer (``cafs.stores.sigv4``) and its settings
(``cafs.stores.aws_config``), fastest first:

- the signer against the worked examples of the S3 SigV4 documentation (pure; so the
  signer is checked independently of any server);
- settings resolution from environment dicts and shared files under ``tmp_path`` (pure);
- addressing and URL checks (pure);
- the store contract against a real moto server (``python -m moto.server``) on
  127.0.0.1, started once for the module and stopped by PID in ``finally``. The fixture
  creates an IAM user and key in moto, then switches moto's authentication on, so every
  request the store makes has its signature checked by botocore's own implementation
  inside moto (a wrong signature is a 403, not silently accepted);
- the ``cafs`` command line end to end (init, import, get, fsck --read-data) on an
  ``s3://`` repository with the AWS_* environment pointing at moto.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cannedhttp import canned_servers, trickle
from fakehttp import FakeServer, QuietHandler
from nginx import free_port
from remote_fixtures import StartProxy
from treegen import assert_same_tree, make_tree

from cafs.errors import NoSpaceError, ObjectNotFound, StoreError, StoreUnavailable, UsageError
from cafs.sources import RetryingStore
from cafs.stores import ObjectExists, open_store
from cafs.stores.aws_config import S3Settings, s3_settings
from cafs.stores.aws_instance import RefreshingCredentials
from cafs.stores.s3 import MIN_PART_SIZE, S3Store
from cafs.stores.sigv4 import (
    EMPTY_SHA256,
    Credentials,
    amz_date,
    canonical_query,
    canonical_request,
    credential_scope,
    sign,
    signing_key,
    string_to_sign,
    uri_encode,
)

# -- the signer: the S3 documentation's examples ---------------------------------------
# https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html

EXAMPLE = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
EXAMPLE_DATE = "20130524T000000Z"
EXAMPLE_HOST = "examplebucket.s3.amazonaws.com"


def test_sigv4_get_object_example_step_by_step() -> None:
    headers = {"host": EXAMPLE_HOST, "range": "bytes=0-9", "x-amz-content-sha256": EMPTY_SHA256,
               "x-amz-date": EXAMPLE_DATE}
    canonical, _signed = canonical_request("GET", "/test.txt", "", headers, EMPTY_SHA256)
    assert canonical == (
        "GET\n/test.txt\n\n"
        "host:examplebucket.s3.amazonaws.com\n"
        "range:bytes=0-9\n"
        "x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n"
        "x-amz-date:20130524T000000Z\n\n"
        "host;range;x-amz-content-sha256;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    scope = credential_scope(EXAMPLE_DATE, "us-east-1", "s3")
    assert string_to_sign(EXAMPLE_DATE, scope, canonical) == (
        "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
        "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972")
    assert signing_key(EXAMPLE.secret_access_key, EXAMPLE_DATE, "us-east-1", "s3").hex() == (
        "dbb893acc010964918f1fd433add87c70e8b0db6be30c1fbeafefa5ec6ba8378")
    out = sign("GET", "/test.txt", "", {"Host": EXAMPLE_HOST, "Range": "bytes=0-9"}, EMPTY_SHA256,
               EXAMPLE, region="us-east-1", date=EXAMPLE_DATE)
    assert out["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41")


@pytest.mark.parametrize("method,path,query,extra,body,expected", [
    ("PUT", "/" + uri_encode("test$file.text"), [],
     {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
     b"Welcome to Amazon S3.", "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"),
    ("GET", "/", [("lifecycle", "")], {}, b"",
     "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"),
    ("GET", "/", [("prefix", "J"), ("max-keys", "2")], {}, b"",
     "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
], ids=["put-object", "get-bucket-lifecycle", "list-objects"])
def test_sigv4_documented_examples(method: str, path: str, query: list[tuple[str, str]],
                                   extra: dict[str, str], body: bytes, expected: str) -> None:
    out = sign(method, path, canonical_query(query), {"Host": EXAMPLE_HOST, **extra},
               hashlib.sha256(body).hexdigest(), EXAMPLE, region="us-east-1", date=EXAMPLE_DATE)
    assert out["authorization"].endswith(f"Signature={expected}")


def test_sigv4_encoding_and_session_token() -> None:
    assert uri_encode("a b+c/d~é", keep_slash=True) == "a%20b%2Bc/d~%C3%A9"
    assert canonical_query([("b", "2"), ("a", "x y"), ("c", ""), ("a", "/")]) == "a=%2F&a=x%20y&b=2&c="
    assert amz_date(datetime(2013, 5, 24, tzinfo=UTC)) == EXAMPLE_DATE
    out = sign("GET", "/k", "", {"host": "h"}, EMPTY_SHA256, Credentials("id", "sec", "tok"),
               region="eu-west-1", date=EXAMPLE_DATE)
    assert out["x-amz-security-token"] == "tok"
    assert "x-amz-security-token" in out["authorization"].split("SignedHeaders=")[1]
    assert "eu-west-1/s3/aws4_request" in out["authorization"]


def test_credentials_repr_hides_everything() -> None:
    creds = Credentials("AKIDSHOWN", "SECRETSHOWN", "TOKENSHOWN")
    settings = S3Settings(credentials=creds, endpoint_url="http://127.0.0.1:1")
    for text in (repr(creds), repr(settings), repr(S3Store("s3://bucket/p", settings))):
        assert "SHOWN" not in text, text


# -- settings ---------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    write(tmp_path / ".aws" / "credentials", "[default]\naws_access_key_id = FILEID\n"
          "aws_secret_access_key = FILESECRET\n\n[work]\naws_access_key_id = WORKID\n"
          "aws_secret_access_key = WORKSECRET\naws_session_token = WORKTOKEN\n")
    write(tmp_path / ".aws" / "config", "[default]\nregion = eu-central-1\n\n"
          "[profile work]\nregion = ap-south-1\nendpoint_url = https://minio.example:9000\n"
          "ca_bundle = /etc/work-ca.pem\ns3 =\n    addressing_style = virtual\n\n"
          "[profile sso]\nsso_session = corp\nregion = us-west-2\n")
    return tmp_path


def test_settings_from_the_default_profile(home: Path) -> None:
    s = s3_settings({"HOME": str(home)})
    assert s.credentials == Credentials("FILEID", "FILESECRET")
    assert s.credentials_from == f"profile 'default' in {home}/.aws/credentials"
    assert (s.region, s.endpoint_url, s.addressing_style, s.ca_file) == ("eu-central-1", None, "auto", None)


def test_settings_from_a_named_profile(home: Path) -> None:
    s = s3_settings({"HOME": str(home), "AWS_PROFILE": "work"})
    assert s.credentials == Credentials("WORKID", "WORKSECRET", "WORKTOKEN")
    assert (s.region, s.endpoint_url, s.addressing_style, s.ca_file) == (
        "ap-south-1", "https://minio.example:9000", "virtual", "/etc/work-ca.pem")


def test_environment_overrides_the_files(home: Path) -> None:
    s = s3_settings({"HOME": str(home), "AWS_PROFILE": "work", "AWS_ACCESS_KEY_ID": "ENVID",
                     "AWS_SECRET_ACCESS_KEY": "ENVSECRET", "AWS_DEFAULT_REGION": "sa-east-1",
                     "AWS_ENDPOINT_URL": "http://generic", "AWS_ENDPOINT_URL_S3": "http://s3only",
                     "CAFS_CA_FILE": "/cafs-ca.pem"})
    assert s.credentials == Credentials("ENVID", "ENVSECRET")
    assert (s.region, s.endpoint_url, s.ca_file) == ("sa-east-1", "http://s3only", "/cafs-ca.pem")
    s = s3_settings({"HOME": str(home), "AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "sa-east-1",
                     "AWS_ENDPOINT_URL": "http://generic", "AWS_CA_BUNDLE": "/aws-ca.pem",
                     "CAFS_CA_FILE": "/cafs-ca.pem"})
    assert (s.region, s.endpoint_url, s.ca_file) == ("us-east-2", "http://generic", "/aws-ca.pem")
    s = s3_settings({"HOME": str(home), "AWS_PROFILE": "work", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true",
                     "AWS_ENDPOINT_URL_S3": "http://s3only"})
    assert s.endpoint_url is None


def test_explicit_file_locations_and_no_credentials(tmp_path: Path) -> None:
    conf = write(tmp_path / "elsewhere" / "conf", "[profile x]\nregion = eu-north-1\n")
    s = s3_settings({"HOME": str(tmp_path / "nohome"), "AWS_CONFIG_FILE": str(conf), "AWS_PROFILE": "x",
                     "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "missing")})
    assert (s.credentials, s.region) == (None, "eu-north-1")
    assert s3_settings({"HOME": str(tmp_path / "nohome")}) == S3Settings()


@pytest.mark.parametrize("env,message", [
    ({"AWS_ACCESS_KEY_ID": "ID"}, "lack AWS_SECRET_ACCESS_KEY"),
    ({"AWS_PROFILE": "nosuch"}, "'nosuch' is in neither"),
    ({"AWS_PROFILE": "sso"}, "sso_session, which cafs does not implement"),
])
def test_settings_refused(home: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        s3_settings({"HOME": str(home), **env})
    assert "FILESECRET" not in str(info.value) and "WORKSECRET" not in str(info.value)


@pytest.mark.parametrize("config", [
    "[profile dev]\nrole_arn = arn:aws:iam::123456789012:role/dev\nsource_profile = dev\n",
    "[profile dev]\nsso_session = corp\nsso_account_id = 123456789012\n",
], ids=["role", "sso"])
def test_a_profile_with_keys_and_a_role_is_refused_not_used_as_its_keys(tmp_path: Path, config: str) -> None:
    # the AWS SDKs assume the role (or use SSO) even where the profile holds keys as well;
    # cafs signed with the bare keys instead: another identity, and a late "access denied"
    write(tmp_path / ".aws" / "credentials", "[dev]\naws_access_key_id = DEVID\naws_secret_access_key = DEVSECRET\n")
    write(tmp_path / ".aws" / "config", config)
    with pytest.raises(UsageError, match="profile 'dev' gets credentials by (role_arn|sso_session)") as info:
        s3_settings({"HOME": str(tmp_path), "AWS_PROFILE": "dev"})
    assert "DEVSECRET" not in str(info.value)


@pytest.mark.parametrize("text", ["garbage without a section\n", "[default]\n  indented = continuation\n= no key\n"],
                         ids=["no-section", "no-key"])
def test_a_malformed_config_file_is_one_line(tmp_path: Path, text: str) -> None:
    # configparser's messages span lines (file, line, the line itself): three lines of stderr
    conf = write(tmp_path / "config", text)
    with pytest.raises(UsageError, match=f"{conf}: cannot read the AWS settings") as info:
        s3_settings({"HOME": str(tmp_path), "AWS_CONFIG_FILE": str(conf), "AWS_EC2_METADATA_DISABLED": "true"})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("file,section,hint", [
    ("config", "[work]", r"has \[work\]; the config file names it \[profile work\]"),
    ("credentials", "[profile work]", r"has \[profile work\]; the credentials file names it \[work\]"),
], ids=["config", "credentials"])
def test_a_profile_named_the_other_files_way_is_pointed_out(tmp_path: Path, file: str, section: str,
                                                           hint: str) -> None:
    # "is in neither" while the file plainly has a [work] section
    write(tmp_path / ".aws" / file, f"{section}\nregion = eu-west-1\n")
    with pytest.raises(UsageError, match=f"'work' is in neither .*{hint}"):
        s3_settings({"HOME": str(tmp_path), "AWS_PROFILE": "work"})


# -- addressing and URLs ----------------------------------------------------------------


def base_url(url: str, **settings: Any) -> str:
    store = S3Store(url, S3Settings(**settings))
    return store._origin + store._root


@pytest.mark.parametrize("url,settings,expected", [
    ("s3://data/p", {}, "https://data.s3.us-east-1.amazonaws.com"),
    ("s3://data/p", {"region": "eu-west-1"}, "https://data.s3.eu-west-1.amazonaws.com"),
    ("s3://data/p", {"region": "cn-north-1"}, "https://data.s3.cn-north-1.amazonaws.com.cn"),
    ("s3://my.data/p", {}, "https://s3.us-east-1.amazonaws.com/my.data"),
    ("s3://data/p", {"addressing_style": "path"}, "https://s3.us-east-1.amazonaws.com/data"),
    ("s3://data", {"endpoint_url": "http://127.0.0.1:9000/"}, "http://127.0.0.1:9000/data"),
    ("s3://data/p", {"endpoint_url": "https://rgw.lan/s3"}, "https://rgw.lan/s3/data"),
    ("s3://data/p", {"endpoint_url": "https://minio.lan", "addressing_style": "virtual"},
     "https://data.minio.lan"),
])
def test_addressing(url: str, settings: dict[str, str], expected: str) -> None:
    assert base_url(url, **settings) == expected


@pytest.mark.parametrize("url", ["s3://", "s3://b", "s3://key:secret@bucket/p", "s3://bucket/a b",
                                 "s3://bucket/p?versionId=1", "s3://bucket/../p", "s3://bucket/p//q"])
def test_bad_urls_are_usage_errors(url: str) -> None:
    with pytest.raises(UsageError) as info:
        S3Store(url)
    assert "secret" not in str(info.value)


def test_a_ca_file_that_cannot_be_read_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    # it was found only by the first request: "TLS failed: [Errno 2] No such file or directory"
    missing = tmp_path / "no-ca.pem"
    with pytest.raises(UsageError, match=f"CA file {missing}: cannot be used"):
        S3Store("s3://bucket/p", S3Settings(endpoint_url="https://127.0.0.1:9", ca_file=str(missing)))
    with pytest.raises(UsageError, match=f"CA file {missing}"):
        S3Store("s3://bucket/p", S3Settings(ca_file=str(missing)))  # AWS itself
    S3Store("s3://bucket/p", S3Settings(endpoint_url="http://127.0.0.1:9", ca_file=str(missing)))  # no TLS


def test_store_url_is_normalized() -> None:
    assert S3Store("s3://bucket/a/b/").url == "s3://bucket/a/b"
    assert S3Store("s3://bucket").url == "s3://bucket"


def sent_headers(store: S3Store, op: Any) -> dict[str, str]:
    """The headers of the request ``op(store)`` makes (it goes no further)."""
    sent: list[dict[str, str]] = []

    def capture(method: str, url: str, **kw: Any) -> urllib3.BaseHTTPResponse:
        sent.append(dict(kw["headers"]))
        raise urllib3.exceptions.HTTPError("captured")

    store._pool.request = capture  # type: ignore[method-assign, assignment]
    with pytest.raises(StoreUnavailable):
        op(store)
    return sent[0]


@pytest.mark.parametrize("scheme,body,expected", [
    ("https", b"pack bytes", "UNSIGNED-PAYLOAD"),
    ("http", b"pack bytes", hashlib.sha256(b"pack bytes").hexdigest()),
    ("https", b"", EMPTY_SHA256),
])
def test_payload_hash_is_signed_over_plain_http_only(scheme: str, body: bytes, expected: str) -> None:
    settings = S3Settings(credentials=Credentials("ID", "SECRET"), endpoint_url=f"{scheme}://s3.lan")
    headers = sent_headers(S3Store("s3://bkt/p", settings), lambda s: s.put("k", body))
    assert headers["x-amz-content-sha256"] == expected
    assert "x-amz-content-sha256" in headers["authorization"]


def test_xml_answers_are_utf8_without_doctype() -> None:
    from cafs.stores.awsxml import parse_xml
    assert parse_xml(b"<?xml version='1.0'?><a>x</a>").text == "x"
    for bad in (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
                "<a>x</a>".encode("utf-16"), b"<a>"):
        with pytest.raises(ValueError):
            parse_xml(bad)


class _MultipartServer:
    """Enough of S3's multipart protocol for one upload, answering CompleteMultipartUpload
    with ``completes`` in turn (the last one from then on); records the requests."""

    def __init__(self, completes: list[bytes]) -> None:
        outer = self
        self.completes = completes
        self.requests: list[str] = []

        class Handler(QuietHandler):
            protocol_version = "HTTP/1.1"

            def _read(self) -> None:
                left = int(self.headers.get("Content-Length") or 0)
                while left:
                    left -= len(self.rfile.read(min(left, 1 << 20)))
                outer.requests.append(f"{self.command} {self.path}")

            def do_POST(self) -> None:
                self._read()
                if self.path.endswith("?uploads="):
                    return self.answer(200, b"<InitiateMultipartUploadResult><UploadId>U1</UploadId>"
                                            b"</InitiateMultipartUploadResult>")
                body = outer.completes.pop(0) if len(outer.completes) > 1 else outer.completes[0]
                self.answer(200, body)

            def do_PUT(self) -> None:
                self._read()
                self.answer(200, b"", {"ETag": '"etag"'})

            def do_DELETE(self) -> None:
                self._read()
                self.answer(204)

        self._http = FakeServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()


KEEPALIVE = b"\n\r\n\r   \n"  # what S3 and MinIO send while a CompleteMultipartUpload runs
DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
COMPLETED = (b'<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
             b"<Key>repo/packs/aa/big</Key><ETag>\"x-2\"</ETag></CompleteMultipartUploadResult>")
FAILED = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


@pytest.mark.parametrize("completes,aborts", [
    ([KEEPALIVE + DECLARATION + COMPLETED], 0),
    ([KEEPALIVE + DECLARATION + FAILED, DECLARATION + COMPLETED], 1),
], ids=["completed", "failed-then-completed"])
def test_a_complete_answer_kept_alive_with_whitespace_is_read(completes: list[bytes], aborts: int) -> None:
    """A slow CompleteMultipartUpload answers 200 at once and whitespace until it is done,
    then its result or an <Error>: a completed upload is a stored pack, and a failure one
    to retry, not 'malformed XML' that stopped the import."""
    server = _MultipartServer(completes)
    try:
        store = RetryingStore(S3Store("s3://bkt/repo", S3Settings(endpoint_url=server.url),
                                      multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE), deadline=20)
        store.put("packs/aa/big", bytes(MIN_PART_SIZE + 1))
    finally:
        server.close()
    assert sum(r.startswith("POST /bkt/repo/packs/aa/big?uploadId=") for r in server.requests) == aborts + 1
    assert sum(r.startswith("DELETE") for r in server.requests) == aborts


# -- a real moto server -----------------------------------------------------------------

START_DEADLINE = 20.0
POLL = 0.05
REGION = "us-east-1"
BUCKET = "cafs-test"


@dataclass
class Moto:
    endpoint: str
    host: str
    creds: Credentials
    http: urllib3.PoolManager

    def settings(self, creds: Credentials | None = None) -> S3Settings:
        return S3Settings(credentials=creds or self.creds, credentials_from="the test",
                          region=REGION, endpoint_url=self.endpoint)

    def store(self, prefix: str, **kw: Any) -> S3Store:
        return S3Store(f"s3://{BUCKET}/{prefix}", self.settings(), **kw)

    def request(self, method: str, path: str, body: bytes = b"", query: str = "",
                service: str = "s3", headers: dict[str, str] | None = None,
                creds: Credentials | None = None) -> urllib3.BaseHTTPResponse:
        """A request signed by the test itself, not by the store under test."""
        signed = sign(method, path, query, {"host": self.host, **(headers or {})},
                      hashlib.sha256(body).hexdigest(), creds or self.creds, region=REGION,
                      date=amz_date(datetime.now(UTC)), service=service)
        url = self.endpoint + path + (f"?{query}" if query else "")
        return self.http.request(method, url, body=body, headers=signed)

    def auth(self, on: bool) -> None:
        r = self.http.request("POST", self.endpoint + "/moto-api/reset-auth", body=b"0" if on else b"inf")
        assert r.status == 200, r.data


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=10.0))
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if http.request("GET", endpoint + "/moto-api/").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto server did not answer within {START_DEADLINE} s")
            time.sleep(POLL)
        admin = Moto(endpoint, f"127.0.0.1:{port}", Credentials("AKIASETUP", "setup"), http)
        # An IAM user allowed everything in S3, and its key; then authentication on.
        def iam(**params: str) -> str:
            body = canonical_query(list({"Version": "2010-05-08", **params}.items())).encode()
            r = admin.request("POST", "/", body, service="iam",
                              headers={"content-type": "application/x-www-form-urlencoded"})
            assert r.status == 200, r.data
            return r.data.decode()
        iam(Action="CreateUser", UserName="cafs")
        iam(Action="PutUserPolicy", UserName="cafs", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam(Action="CreateAccessKey", UserName="cafs")
        creds = Credentials(re.search(r"<AccessKeyId>(\w+)</AccessKeyId>", key).group(1),  # type: ignore[union-attr]
                            re.search(r"<SecretAccessKey>(\S+?)</SecretAccessKey>", key).group(1))  # type: ignore[union-attr]
        server = Moto(endpoint, admin.host, creds, http)
        server.auth(True)
        r = server.request("PUT", f"/{BUCKET}")
        assert r.status == 200, r.data
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        http.clear()


DATA = bytes(range(256)) * 257  # 65792 bytes, every byte value at every offset mod 256


@pytest.fixture
def store(moto: Moto, request: pytest.FixtureRequest) -> S3Store:
    """A store under a prefix of its own (the test's name)."""
    return moto.store("t/" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name))


def test_get_ranges_are_exact(store: S3Store) -> None:
    store.put("packs/ab/obj", DATA)
    assert store.get("packs/ab/obj") == DATA
    assert store.get("packs/ab/obj", 1000, 60000) == DATA[1000:61000]
    assert store.get("packs/ab/obj", 0, 1) == DATA[:1]
    assert store.get("packs/ab/obj", len(DATA) - 5) == DATA[-5:]
    assert store.get("packs/ab/obj", len(DATA) - 5, 5) == DATA[-5:]
    assert store.get("packs/ab/obj", 7, 0) == b""
    assert store.get("packs/ab/obj", len(DATA)) == b""


@pytest.mark.parametrize("offset,length", [(len(DATA) - 4, 5), (len(DATA), 1), (len(DATA) + 10, None),
                                           (len(DATA) + 1, 0)])
def test_get_past_the_end_is_an_error(store: S3Store, offset: int, length: int | None) -> None:
    store.put("obj", DATA)
    with pytest.raises(StoreError, match="past the end") as info:
        store.get("obj", offset, length)
    assert not isinstance(info.value, (ObjectNotFound, StoreUnavailable))


def test_missing_object(store: S3Store) -> None:
    for offset, length in ((0, None), (10, 5), (0, 0)):
        with pytest.raises(ObjectNotFound, match=re.escape(f"{store.url}/nope")):
            store.get("nope", offset, length)


def test_put_replaces(store: S3Store) -> None:
    store.put("k", b"first")
    store.put("k", bytearray(b"second"))
    store.put("empty", memoryview(b""))
    assert store.get("k") == b"second"
    assert store.get("empty") == b""


def test_exclusive_put(store: S3Store) -> None:
    store.put("refs/x/1", b"one", exclusive=True)
    with pytest.raises(ObjectExists, match="exists already"):
        store.put("refs/x/1", b"two", exclusive=True)
    assert store.get("refs/x/1") == b"one"


def test_multipart_put_reads_back_exact(moto: Moto) -> None:
    store = moto.store("t/multipart", multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    body = os.urandom(2 * MIN_PART_SIZE + 12345)  # three parts, the last a short one
    store.put("packs/big", body)
    head = moto.request("HEAD", f"/{BUCKET}/t/multipart/packs/big")
    assert head.headers["ETag"].endswith('-3"')  # the ETag of a three-part upload
    assert store.get("packs/big") == body
    assert store.get("packs/big", MIN_PART_SIZE - 10, 20) == body[MIN_PART_SIZE - 10:MIN_PART_SIZE + 10]
    assert dict(store.list("packs/")) == {"packs/big": len(body)}


def test_exclusive_multipart_put_is_refused_and_aborted(moto: Moto) -> None:
    store = moto.store("t/multipart-excl", multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE)
    first = os.urandom(MIN_PART_SIZE + 1)
    store.put("obj", first, exclusive=True)
    with pytest.raises(ObjectExists):
        store.put("obj", os.urandom(MIN_PART_SIZE + 2), exclusive=True)
    assert store.get("obj") == first
    uploads = moto.request("GET", f"/{BUCKET}", query="prefix=t%2Fmultipart-excl%2F&uploads=")
    assert uploads.status == 200 and b"<UploadId>" not in uploads.data  # the refused upload was aborted


def test_list_pages_and_skips_foreign_keys(moto: Moto) -> None:
    store = moto.store("t/list")
    keys = {f"packs/{i % 7:02x}/{i:06d}": i % 13 for i in range(1003)}  # more than one page of 1000
    moto.auth(False)  # moto checks signatures slowly; this is setup, not the test
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kv: store.put(kv[0], b"x" * kv[1]), keys.items()))
        for foreign in ("t/list/packs/a b", "t/list/packs/dir/", "t/list/packs//x", "t/list-other/packs/y",
                        "t/other/packs/z"):
            assert moto.request("PUT", f"/{BUCKET}/{uri_encode(foreign, keep_slash=True)}", b"f").status == 200
        store.put("index/1", b"i")
    finally:
        moto.auth(True)
    for foreign in ("t/list/packs/a b", "t/list/packs/dir/", "t/list/packs//x", "t/list-other/packs/y"):
        raw = moto.request("GET", f"/{BUCKET}", query=canonical_query([("list-type", "2"), ("prefix", foreign)]))
        assert f"<Key>{foreign}</Key>".encode() in raw.data  # the server holds it as named
    assert dict(store.list("packs/")) == keys
    assert dict(store.list("")) == {**keys, "index/1": 1}
    assert list(store.list("nothing/")) == []
    with pytest.raises(StoreError):
        list(store.list("packs"))


def test_delete(store: S3Store) -> None:
    store.put("locks/a", b"a")
    store.delete("locks/a")
    store.delete("locks/a")  # missing is fine
    with pytest.raises(ObjectNotFound):
        store.get("locks/a")
    assert list(store.list("")) == []


def test_wrong_secret_is_a_clear_store_error(moto: Moto) -> None:
    bad = Credentials(moto.creds.access_key_id, "not-the-secret-KEEPOUT")
    store = S3Store(f"s3://{BUCKET}/t/denied", moto.settings(bad))
    for op in (lambda: store.get("packs/k", 0, 10), lambda: store.put("packs/k", b"x"),
               lambda: list(store.list(""))):
        with pytest.raises(StoreError) as info:
            op()
        message = str(info.value)
        assert not isinstance(info.value, (StoreUnavailable, ObjectNotFound))
        assert f"s3://{BUCKET}/t/denied" in message and "access denied" in message
        assert "SignatureDoesNotMatch" in message and "credentials from the test" in message
        assert "KEEPOUT" not in message and moto.creds.access_key_id not in message


def test_missing_bucket_is_not_a_missing_object(moto: Moto) -> None:
    store = S3Store("s3://no-such-bucket/p", moto.settings())
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as info:
        store.get("config")
    assert not isinstance(info.value, ObjectNotFound)


def test_anonymous_requests_are_unsigned(moto: Moto) -> None:
    store = moto.store("t/public")
    store.put("private", b"private bytes")
    r = moto.request("PUT", f"/{BUCKET}/t/public/obj", b"public bytes", headers={"x-amz-acl": "public-read"})
    assert r.status == 200, r.data
    anon = S3Store(f"s3://{BUCKET}/t/public", S3Settings(endpoint_url=moto.endpoint))
    sent: list[dict[str, str]] = []
    real = anon._pool.request

    def spy(method: str, url: str, **kw: Any) -> urllib3.BaseHTTPResponse:
        sent.append(dict(kw["headers"]))
        return real(method, url, **kw)

    anon._pool.request = spy  # type: ignore[method-assign, assignment]
    moto.auth(False)  # moto with authentication on cannot serve anonymous requests at all
    try:
        assert anon.get("obj", 7, 5) == b"bytes"
        assert dict(anon.list("")) == {"obj": 12, "private": 13}
        with pytest.raises(StoreError, match="access denied.*went unsigned"):
            anon.get("private")
    finally:
        moto.auth(True)
    assert sent and all(not any(h.lower().startswith(("authorization", "x-amz-")) for h in hdrs)
                        for hdrs in sent)


@pytest.mark.parametrize("mode,options", [
    ("status", {"status": 503}), ("status", {"status": 500}), ("short_body", {}),
    ("reset_mid_body", {}), ("stall", {"seconds": 2.0}), ("refuse", {}),
])
def test_faults_are_unavailable(moto: Moto, fault_proxy: StartProxy, mode: str, options: dict[str, Any]) -> None:
    moto.store("t/faults").put("obj", DATA)
    proxy = fault_proxy(moto.endpoint)
    settings = S3Settings(credentials=moto.creds, region=REGION, endpoint_url=proxy.url)
    store = S3Store(f"s3://{BUCKET}/t/faults", settings, timeout=0.5)
    assert store.get("obj", 5, 10) == DATA[5:15]  # signed for the proxy's address, checked by moto
    proxy.set_mode(mode, **options)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable, match=f"s3://{BUCKET}/t/faults/obj"):
        store.get("obj", 0, len(DATA))
    if mode in ("status", "refuse", "stall"):
        with pytest.raises(StoreUnavailable):
            store.put("other", b"new")  # (a stalled PUT may still land later: not "obj")
    proxy.set_mode("pass")
    assert store.get("obj") == DATA


def test_full_store_is_no_space(moto: Moto, fault_proxy: StartProxy) -> None:
    proxy = fault_proxy(moto.endpoint)
    store = S3Store(f"s3://{BUCKET}/t/full", S3Settings(credentials=moto.creds, endpoint_url=proxy.url))
    proxy.set_mode("status", status=507, method="PUT")
    with pytest.raises(NoSpaceError, match=f"s3://{BUCKET}/t/full/k"):
        store.put("k", b"v")


def test_a_trickling_answer_is_unavailable_within_the_timeout() -> None:
    with canned_servers() as start:
        server = start(trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n", b"x" * 400, 0.05))
        store = S3Store("s3://bucket/repo", S3Settings(endpoint_url=f"http://127.0.0.1:{server.port}"), timeout=0.5)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="slower than"):
            store.get("config")
        assert time.monotonic() - started < 2


def test_refused_connection_is_unavailable() -> None:
    store = S3Store("s3://bucket/p", S3Settings(credentials=Credentials("ID", "SECRET"),
                                                endpoint_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(StoreUnavailable, match="s3://bucket/p/k") as info:
        store.get("k", 0, 1)
    assert "SECRET" not in str(info.value)


def test_open_store_reads_the_environment(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in aws_env(moto, tmp_path).items():
        monkeypatch.setenv(name, value)
    store = open_store(f"s3://{BUCKET}/t/open")
    store.put("k", b"v")
    assert store.get("k") == b"v"


# -- end to end through the command line --------------------------------------------------


def aws_env(moto: Moto, home: Path) -> dict[str, str]:
    return {"HOME": str(home), "AWS_ACCESS_KEY_ID": moto.creds.access_key_id,
            "AWS_SECRET_ACCESS_KEY": moto.creds.secret_access_key, "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_CONFIG_FILE": str(home / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials")}


def test_cli_end_to_end(moto: Moto, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", seed=11, big_file_size=3 << 20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(aws_env(moto, tmp_path), CAFS_CACHE_DIR=str(tmp_path / "cache"))
    cafs = Path(sys.executable).with_name("cafs")
    repo = f"s3://{BUCKET}/e2e/repo"

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([str(cafs), *map(str, args)], check=False, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"cafs {args[0]}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    run("init", repo, "--chunk-min", "16K", "--chunk-avg", "64K", "--chunk-max", "256K", "--pack-size", "512K")
    run("import", src, repo, "--name", "ds", "--no-progress")
    run("get", f"{repo}#ds", tmp_path / "out")
    assert_same_tree(src, tmp_path / "out")
    run("fsck", repo, "--read-data")
    packs = S3Store(repo, moto.settings()).list("packs/")
    assert sum(1 for _ in packs) > 3


def _uploads(moto: Moto, prefix: str) -> list[str]:
    """The keys of the unfinished multipart uploads under ``prefix``, as the server lists them."""
    r = moto.request("GET", f"/{BUCKET}", query=canonical_query([("prefix", prefix), ("uploads", "")]))
    assert r.status == 200, r.data
    return re.findall(r"<Key>([^<]*)</Key>", r.data.decode())


def test_gc_aborts_the_upload_an_import_killed_mid_pack_left(moto: Moto, fault_proxy: StartProxy,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of an import in the middle of a multipart upload leaves its parts in the
    bucket, billed, invisible to listings; the import run again does not need them, and
    gc aborts them (under its exclusive lock no import is writing)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(20 << 20))  # one pack above the 16 MiB threshold: 2 parts
    repo = f"s3://{BUCKET}/killed/repo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(aws_env(moto, tmp_path), CAFS_CACHE_DIR=str(tmp_path / "cache"))

    def cafs(*args: str | Path, endpoint: str = moto.endpoint) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "cafs.cli", *map(str, args)],
                                env={**env, "AWS_ENDPOINT_URL_S3": endpoint},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ok(proc: subprocess.Popen[bytes]) -> None:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (out + err).decode()

    ok(cafs("init", repo, "--pack-size", "24M"))
    proxy = fault_proxy(moto.endpoint)
    proxy.set_mode("stall", match=r"partNumber=2")
    imp = cafs("import", src, repo, "--name", "ds", "--no-progress", endpoint=proxy.url)
    try:
        deadline = time.monotonic() + 60
        while not any(s.fault for s in proxy.seen()):
            assert imp.poll() is None, imp.communicate()
            assert time.monotonic() < deadline, "the import never sent its second part"
            time.sleep(POLL)
    finally:
        imp.kill()
        imp.communicate()
    proxy.set_mode("pass")
    assert len(_uploads(moto, "killed/repo/")) == 1
    ok(cafs("import", src, repo, "--name", "ds", "--no-progress"))  # resumes: uploads the pack whole
    assert len(_uploads(moto, "killed/repo/")) == 1  # the killed one's parts are still there
    # gc spares an upload begun less than an hour ago (a live writer's): count this one stale
    from cafs import gc
    from cafs.cli import main
    monkeypatch.setattr(gc, "STALE_TEMPORARY_SECONDS", -3600.0)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["gc", repo]) == 0
    assert _uploads(moto, "killed/repo/") == []
    ok(cafs("fsck", repo, "--read-data"))


def test_only_stale_uploads_under_the_prefix_are_aborted() -> None:
    """By the server's clock (its Date header), over several pages of the listing; an
    upload of a foreign name, or one begun within ``older_than``, stays."""
    date = "Tue, 24 Nov 2026 12:00:00 GMT"

    def page(uploads: list[tuple[str, str, str]], more: str = "") -> bytes:
        body = "".join(f"<Upload><Key>{k}</Key><UploadId>{u}</UploadId><Initiated>{t}</Initiated></Upload>"
                       for k, u, t in uploads)
        truncated = f"<IsTruncated>true</IsTruncated>{more}" if more else "<IsTruncated>false</IsTruncated>"
        doc = f'<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">{truncated}{body}</ListMultipartUploadsResult>'
        return doc.encode()

    pages = [page([("repo/packs/aa/old", "u1", "2026-11-24T10:00:00.000Z"),
                   ("repo/packs/bb/fresh", "u2", "2026-11-24T11:30:00.000Z")],
                  "<NextKeyMarker>repo/packs/bb/fresh</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>"),
             page([("repo/packs/cc/a%20b", "u3", "2026-11-24T09:00:00.000Z"),
                   ("repo/index/old", "u4", "2026-11-23T09:00:00.000Z")])]
    parts = b"<ListPartsResult><IsTruncated>false</IsTruncated><Part><Size>5242880</Size></Part><Part><Size>100</Size></Part></ListPartsResult>"

    def answer(conn: Any, n: int) -> bool:
        request = server.requests[-1].split(b"\r\n")[0].decode()
        if request.startswith("GET /bkt?") and "uploads=" in request:
            body = pages[1 if "key-marker=repo%2Fpacks%2Fbb%2Ffresh" in request else 0]
        elif request.startswith("GET "):
            body = parts
        else:
            conn.sendall(f"HTTP/1.1 204 No Content\r\nDate: {date}\r\n\r\n".encode())
            return True
        conn.sendall(f"HTTP/1.1 200 OK\r\nDate: {date}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        return True

    with canned_servers() as start:
        server = start(answer)
        store = S3Store("s3://bkt/repo", S3Settings(endpoint_url=f"http://127.0.0.1:{server.port}"))
        assert store.remove_temporaries("", 3600) == (2, 2 * 5242980)
        aborted = [r.split(b"\r\n")[0].decode() for r in server.requests if r.startswith(b"DELETE")]
        assert aborted == ["DELETE /bkt/repo/packs/aa/old?uploadId=u1 HTTP/1.1",
                           "DELETE /bkt/repo/index/old?uploadId=u4 HTTP/1.1"]


# -- credentials from the instance (IMDSv2) or the container (ECS) ---------------------------


class FakeMetadata:
    """IMDSv2 and an ECS credentials endpoint on 127.0.0.1, handing out ``creds``: a session
    token is required for IMDS reads, the authorization token for ECS. ``fail`` makes
    every request answer 500; ``fetches`` counts credential documents served."""

    def __init__(self, creds: Credentials, expires_in: float = 3600.0) -> None:
        outer = self
        self.creds, self.expires_in, self.fail, self.fetches = creds, expires_in, False, 0

        def document() -> bytes:
            outer.fetches += 1
            expiry = datetime.fromtimestamp(time.time() + outer.expires_in, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            return json.dumps({"Code": "Success", "AccessKeyId": outer.creds.access_key_id,
                               "SecretAccessKey": outer.creds.secret_access_key,
                               "Token": outer.creds.session_token, "Expiration": expiry}).encode()

        class Handler(QuietHandler):
            def do_PUT(self) -> None:
                if outer.fail or self.path != "/latest/api/token" \
                        or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    return self.answer(500 if outer.fail else 400)
                self.answer(200, b"imds-session-token")

            def do_GET(self) -> None:
                if outer.fail:
                    return self.answer(500)
                if self.path == "/ecs-creds":
                    ok = self.headers.get("Authorization") == "ecs-auth"
                    return self.answer(200, document()) if ok else self.answer(401)
                if self.headers.get("X-aws-ec2-metadata-token") != "imds-session-token":
                    return self.answer(401)
                if self.path == "/latest/meta-data/iam/security-credentials/":
                    return self.answer(200, b"training-role")
                if self.path == "/latest/meta-data/iam/security-credentials/training-role":
                    return self.answer(200, document())
                self.answer(404)

        self._http = FakeServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()


def _role_credentials(moto: Moto) -> Credentials:
    """What the fake metadata hands out to the store: the test user's key (moto checks a key
    and its secret; it does not know STS session tokens, which the real services add)."""
    return Credentials(moto.creds.access_key_id, moto.creds.secret_access_key, None)


def _metadata_env(moto: Moto, tmp_path: Path, **more: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "AWS_REGION": REGION, "AWS_ENDPOINT_URL_S3": moto.endpoint,
            "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"), **more}


def test_instance_role_credentials_are_used_and_refreshed(moto: Moto, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.stores import aws_instance

    fake = FakeMetadata(_role_credentials(moto))
    try:
        settings = s3_settings(_metadata_env(moto, tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url))
        assert "instance metadata" in settings.credentials_from
        store = S3Store(f"s3://{BUCKET}/imds", settings)
        store.put("a", b"through the instance role")
        assert store.get("a") == b"through the instance role" and fake.fetches == 1
        monkeypatch.setattr(aws_instance, "REFRESH_MARGIN", 7200.0)  # every request refreshes
        store.get("a")
        assert fake.fetches == 2
        fake.fail = True  # the service is down: the old credentials, still valid, carry on
        assert store.get("a") == b"through the instance role"
        fake.expires_in = -60  # ...until they have expired
        fake.fail = False
        store.get("a")
        fake.fail = True
        with pytest.raises(StoreUnavailable, match="instance metadata service"):
            store.get("a")
    finally:
        fake.close()
    disabled = s3_settings(_metadata_env(moto, tmp_path, AWS_EC2_METADATA_SERVICE_ENDPOINT=fake.url,
                                         AWS_EC2_METADATA_DISABLED="true"))
    assert disabled.credentials is None


def test_container_credentials_are_used(moto: Moto, tmp_path: Path) -> None:
    fake = FakeMetadata(_role_credentials(moto))
    try:
        env = _metadata_env(moto, tmp_path, AWS_CONTAINER_CREDENTIALS_FULL_URI=fake.url + "/ecs-creds",
                            AWS_CONTAINER_AUTHORIZATION_TOKEN="ecs-auth")
        store = S3Store(f"s3://{BUCKET}/ecs", s3_settings(env))
        store.put("b", b"through the task role")
        assert store.get("b") == b"through the task role"
        with pytest.raises(UsageError, match="container credentials endpoint"):
            s3_settings({**env, "AWS_CONTAINER_AUTHORIZATION_TOKEN": "wrong"})
    finally:
        fake.close()


def _helper_profile(tmp_path: Path, body: str, args: str = "") -> dict[str, str]:
    """The environment of a profile whose credential_process runs ``body`` in Python."""
    script = write(tmp_path / "helper.py", body)
    conf = write(tmp_path / "helper-config", f"[profile helper]\nregion = {REGION}\n"
                 f"credential_process = {sys.executable} {script} {args}\n")
    return {"HOME": str(tmp_path), "AWS_PROFILE": "helper", "AWS_CONFIG_FILE": str(conf),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}


HELPER = """
import datetime, json, sys, time
with open(sys.argv[1], "a") as runs:
    runs.write("x")
expiry = datetime.datetime.fromtimestamp(time.time() + 3600, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({"Version": 1, "AccessKeyId": sys.argv[2], "SecretAccessKey": sys.argv[3],
                  "Expiration": expiry}))
"""


def test_credential_process_credentials_are_used_and_refreshed(moto: Moto, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.stores import aws_instance

    runs = tmp_path / "runs"
    env = _helper_profile(tmp_path, HELPER, f"{runs} {moto.creds.access_key_id} {moto.creds.secret_access_key}")
    settings = s3_settings({**env, "AWS_ENDPOINT_URL_S3": moto.endpoint})
    assert settings.credentials_from.startswith("the credential_process of profile 'helper'")
    store = S3Store(f"s3://{BUCKET}/process", settings)
    store.put("a", b"through a credential helper")
    assert store.get("a") == b"through a credential helper" and runs.read_text() == "x"
    monkeypatch.setattr(aws_instance, "REFRESH_MARGIN", 7200.0)  # every request runs it again
    store.get("a")
    assert runs.read_text() == "xx"


@pytest.mark.parametrize("body,message", [
    ("import sys; sys.stderr.write('not logged in\\n'); sys.exit(3)", "exited with status 3: not logged in"),
    ("print('{\"Version\": 2, \"AccessKeyId\": \"AKID\", \"SecretAccessKey\": \"SEKRET\"}')",
     "printed no credentials AWS's way .*Version is not 1"),
    ("print('{\"Version\": 1, \"AccessKeyId\": \"AKID\"}')", "printed no credentials .*no 'SecretAccessKey'"),
    ("print('SEKRET')", "printed no credentials"),
    # a number for the token was taken, and failed when the first request was signed
    ("print('{\"Version\": 1, \"AccessKeyId\": \"AKID\", \"SecretAccessKey\": \"SEKRET\", \"SessionToken\": 5}')",
     "printed no credentials .*not a string"),
])
def test_credential_process_failures_are_clear_usage_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        s3_settings(_helper_profile(tmp_path, body))
    assert "profile 'helper'" in str(info.value) and "SEKRET" not in str(info.value)


def test_credential_process_that_is_not_there(tmp_path: Path) -> None:
    conf = write(tmp_path / "config", "[default]\ncredential_process = /nonexistent/aws-helper --profile x\n")
    with pytest.raises(UsageError, match="no program '/nonexistent/aws-helper'"):
        s3_settings({"HOME": str(tmp_path), "AWS_CONFIG_FILE": str(conf)})


class FakeSts:
    """STS answering AssumeRoleWithWebIdentity with ``creds``, after checking the form;
    ``forms`` keeps every form received, ``deny`` answers 403 AccessDenied."""

    def __init__(self, creds: Credentials) -> None:
        outer = self
        self.forms: list[dict[str, str]] = []
        self.deny = False

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                from urllib.parse import parse_qsl
                form = dict(parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                outer.forms.append(form)
                expiry = datetime.fromtimestamp(time.time() + 3600, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                if outer.deny or form.get("Action") != "AssumeRoleWithWebIdentity" or "Authorization" in self.headers:
                    status, body = 403, ("<ErrorResponse><Error><Code>AccessDenied</Code><Message>Not authorized "
                                         "to perform sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>")
                else:
                    status, body = 200, (
                        '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                        "<AssumeRoleWithWebIdentityResult><Credentials>"
                        f"<AccessKeyId>{creds.access_key_id}</AccessKeyId>"
                        f"<SecretAccessKey>{creds.secret_access_key}</SecretAccessKey>"
                        f"<Expiration>{expiry}</Expiration></Credentials></AssumeRoleWithWebIdentityResult>"
                        "</AssumeRoleWithWebIdentityResponse>")
                self.answer(status, body.encode())

        self._http = FakeServer(Handler)
        self.url = self._http.url

    def close(self) -> None:
        self._http.close()


ROLE = "arn:aws:iam::123456789012:role/training"


def test_web_identity_is_exchanged_with_sts_and_the_token_reread(moto: Moto, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cafs.stores import aws_instance

    sts = FakeSts(_role_credentials(moto))
    try:
        token = write(tmp_path / "token", "eyJhbGciOi.projected-token-1.sig\n")
        env = _metadata_env(moto, tmp_path, AWS_ROLE_ARN=ROLE, AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
                            AWS_ROLE_SESSION_NAME="job-7", AWS_ENDPOINT_URL_STS=sts.url,
                            AWS_EC2_METADATA_DISABLED="true")
        settings = s3_settings(env)
        assert settings.credentials_from == f"role {ROLE} for the web identity of AWS_WEB_IDENTITY_TOKEN_FILE"
        store = S3Store(f"s3://{BUCKET}/web-identity", settings)
        store.put("w", b"through a web identity")
        assert store.get("w") == b"through a web identity"
        assert len(sts.forms) == 1
        assert {k: sts.forms[0][k] for k in ("RoleArn", "RoleSessionName", "WebIdentityToken")} == {
            "RoleArn": ROLE, "RoleSessionName": "job-7", "WebIdentityToken": "eyJhbGciOi.projected-token-1.sig"}
        token.write_text("eyJhbGciOi.projected-token-2.sig\n")  # the platform rotates it
        monkeypatch.setattr(aws_instance, "REFRESH_MARGIN", 7200.0)
        assert store.get("w") == b"through a web identity"
        assert sts.forms[-1]["WebIdentityToken"] == "eyJhbGciOi.projected-token-2.sig"
        sts.deny = True
        with pytest.raises(UsageError, match="answered 403 AccessDenied: Not authorized") as info:
            s3_settings(env)
        assert "projected-token" not in str(info.value)
    finally:
        sts.close()
    with pytest.raises(UsageError, match="token file .*missing"):
        s3_settings({**env, "AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "missing")})
    with pytest.raises(UsageError, match="lacks AWS_WEB_IDENTITY_TOKEN_FILE"):
        s3_settings({**env, "AWS_WEB_IDENTITY_TOKEN_FILE": ""})
    with pytest.raises(UsageError, match="STS at http://127.0.0.1:9 "):
        s3_settings({**env, "AWS_ENDPOINT_URL_STS": "http://127.0.0.1:9"})


def test_web_identity_from_a_profile_reads_an_sts_answer(moto: Moto, tmp_path: Path) -> None:
    """The answer of moto's STS (authentication off for it: moto wants every request signed,
    but this one is unsigned in AWS too) is read into temporary credentials."""
    token = write(tmp_path / "token", "eyJhbGciOi.token.sig")
    conf = write(tmp_path / "config", f"[profile eks]\nrole_arn = {ROLE}\nweb_identity_token_file = {token}\n"
                 f"endpoint_url = {moto.endpoint}\nregion = {REGION}\n")
    moto.auth(False)
    try:
        settings = s3_settings({"HOME": str(tmp_path), "AWS_PROFILE": "eks", "AWS_CONFIG_FILE": str(conf)})
    finally:
        moto.auth(True)
    assert isinstance(settings.credentials, RefreshingCredentials)
    creds = settings.credentials.current()
    assert creds.access_key_id.startswith("ASIA") and creds.session_token
    assert settings.credentials_from.endswith(f"web identity of profile 'eks' in {conf}")
    bad = write(tmp_path / "bad-config", "[profile eks]\nweb_identity_token_file = /t\n")
    with pytest.raises(UsageError, match="web_identity_token_file but no role_arn"):
        s3_settings({"HOME": str(tmp_path), "AWS_PROFILE": "eks", "AWS_CONFIG_FILE": str(bad)})


def test_metadata_documents_are_read_whole_and_kept_secret(tmp_path: Path) -> None:
    from cafs.stores.aws_instance import instance_credentials

    fake = FakeMetadata(Credentials("AKIDROLE", "role-secret-1", "role-token-1"))
    try:
        got = instance_credentials({"AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.url})
        assert got is not None
        creds = got.current()
        assert (creds.access_key_id, creds.secret_access_key, creds.session_token) == \
            ("AKIDROLE", "role-secret-1", "role-token-1")
        assert "role-secret-1" not in repr(got) and set(got.secrets()) >= {"role-secret-1", "role-token-1"}
    finally:
        fake.close()
    assert instance_credentials({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"}) is None

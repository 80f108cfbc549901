"""AWS credentials that another program or service hands out: a profile's
``credential_process``, and a web identity token exchanged with STS (what EKS's IAM roles
for service accounts and other OIDC setups provide). Both refresh before they expire,
through ``RefreshingCredentials``.

Contract:

- ``process_credentials(command, where)`` runs ``command`` (split like a shell would, but
  run without one, as the AWS CLI does) and reads the JSON it prints: ``Version`` 1,
  ``AccessKeyId``, ``SecretAccessKey``, optional ``SessionToken`` and ``Expiration``
  (ISO 8601; without it the credentials never expire and the command runs once). The
  command inherits the environment; it must finish within ``PROCESS_TIMEOUT`` seconds.
- ``web_identity_credentials(role_arn, token_file, session_name, endpoint, where)`` calls
  STS ``AssumeRoleWithWebIdentity`` (an unsigned POST: the token is the proof) with the
  token read from ``token_file`` at each refresh, since the platform rotates it.
- Both fetch once at once, so that a helper or role that cannot give credentials is a
  ``UsageError`` when the store is opened, naming the profile or variable, never a late
  "access denied". A later refresh that fails raises ``StoreUnavailable`` (the old
  credentials are used while still valid; see ``RefreshingCredentials``).
- No secret (keys, tokens, the web identity token) appears in a message. A helper's
  standard error is quoted (its last 300 characters), since that is where it says why.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import time
from urllib.parse import urlencode

from cafs.errors import StoreUnavailable, UsageError
from cafs.stores import awsxml
from cafs.stores.aws_instance import HttpCredentialSource, RefreshingCredentials, parse_expiry
from cafs.stores.sigv4 import Credentials

PROCESS_TIMEOUT = 60.0
STS_VERSION = "2011-06-15"
STS_DURATION = 3600


class _Process:
    def __init__(self, argv: list[str], where: str) -> None:
        self._argv = argv
        self.what = f"the credential_process of {where}"

    def credentials(self) -> tuple[Credentials, float]:
        try:
            done = subprocess.run(self._argv, capture_output=True, timeout=PROCESS_TIMEOUT,
                                  stdin=subprocess.DEVNULL, check=False)
        except FileNotFoundError:
            raise StoreUnavailable(f"{self.what}: no program {self._argv[0]!r}") from None
        except subprocess.TimeoutExpired:
            raise StoreUnavailable(f"{self.what}: no answer within {PROCESS_TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise StoreUnavailable(f"{self.what}: cannot run {self._argv[0]!r}: {exc.strerror}") from None
        if done.returncode != 0:
            why = done.stderr.decode(errors="replace").strip()[-300:]
            raise StoreUnavailable(f"{self.what} exited with status {done.returncode}"
                                   + (f": {why}" if why else ""))
        try:
            doc = json.loads(done.stdout)
            if doc.get("Version") != 1:
                raise ValueError("Version is not 1")
            creds = Credentials(_string(doc, "AccessKeyId"), _string(doc, "SecretAccessKey"),
                                doc.get("SessionToken") or None)
            expires = parse_expiry(doc["Expiration"]) if doc.get("Expiration") else math.inf
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreUnavailable(f"{self.what} printed no credentials AWS's way "
                                   f"(a JSON object with Version 1): {_reason(exc)}") from None
        return creds, expires


class _WebIdentity(HttpCredentialSource):
    def __init__(self, role_arn: str, token_file: str, session_name: str, endpoint: str, where: str) -> None:
        super().__init__(f"STS at {endpoint} (web identity of {where})")
        self._role_arn = role_arn
        self._token_file = token_file
        self._session_name = session_name
        self._endpoint = endpoint

    def credentials(self) -> tuple[Credentials, float]:
        try:
            with open(self._token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreUnavailable(f"{self.what}: token file {self._token_file}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        body = urlencode({"Action": "AssumeRoleWithWebIdentity", "Version": STS_VERSION,
                          "RoleArn": self._role_arn, "RoleSessionName": self._session_name,
                          "DurationSeconds": str(STS_DURATION), "WebIdentityToken": token})
        answer = self._post(body.encode())
        try:
            root = awsxml.parse_xml(answer)
            result = awsxml.children(root, "AssumeRoleWithWebIdentityResult")[0]
            c = awsxml.children(result, "Credentials")[0]
            creds = Credentials(awsxml.text(c, "AccessKeyId"), awsxml.text(c, "SecretAccessKey"),
                                awsxml.text(c, "SessionToken") or None)
            if not (creds.access_key_id and creds.secret_access_key):
                raise ValueError("no key in the answer")
            return creds, parse_expiry(awsxml.text(c, "Expiration"))
        except (ValueError, IndexError) as exc:
            raise StoreUnavailable(f"{self.what}: not an AssumeRoleWithWebIdentity answer: {_reason(exc)}") from None

    def _post(self, body: bytes) -> bytes:
        resp = self._send("POST", self._endpoint, {"Content-Type": "application/x-www-form-urlencoded"}, body)
        if resp.status != 200:
            code, message = awsxml.error_fields(bytes(resp.data))
            raise StoreUnavailable(f"{self.what} answered {resp.status}"
                                   + (f" {code}: {' '.join(message.split())[:300]}" if code else ""))
        return bytes(resp.data)


def process_credentials(command: str, where: str) -> RefreshingCredentials:
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"{where}: credential_process {command!r} cannot be split: {exc}") from None
    if not argv:
        raise UsageError(f"{where}: credential_process is empty")
    return RefreshingCredentials(_Process(argv, where), f"the credential_process of {where}").fetched()


def web_identity_credentials(role_arn: str, token_file: str, session_name: str, endpoint: str,
                             where: str) -> RefreshingCredentials:
    fetch = _WebIdentity(role_arn, token_file, session_name or f"cafs-{int(time.time())}", endpoint, where)
    return RefreshingCredentials(fetch, f"role {role_arn} for the web identity of {where}").fetched()


def _string(doc: dict[str, object], key: str) -> str:
    value = doc[key]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} is not a string")
    return value


def _reason(exc: BaseException) -> str:
    return f"no {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__

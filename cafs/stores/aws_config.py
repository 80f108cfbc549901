"""Where an S3 store's credentials, region, endpoint and CA file come from: the usual AWS
places, resolved once when a store is opened (never at import time).

- credentials: ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` (+ ``AWS_SESSION_TOKEN``);
  else the profile's ``aws_access_key_id`` / ``aws_secret_access_key`` /
  ``aws_session_token`` in the shared credentials file (``$AWS_SHARED_CREDENTIALS_FILE``,
  else ``~/.aws/credentials``; section ``[NAME]``), else in the config file
  (``$AWS_CONFIG_FILE``, else ``~/.aws/config``; section ``[profile NAME]``, or
  ``[default]``); else the profile's ``credential_process``; else an ECS task role's or EC2
  instance role's temporary credentials (``cafs.stores.aws_instance``); else none at all,
  and requests go unsigned (public buckets). Before the files, a web identity
  (``AWS_ROLE_ARN`` + ``AWS_WEB_IDENTITY_TOKEN_FILE``, or the profile's ``role_arn`` +
  ``web_identity_token_file``) is exchanged with STS (``cafs.stores.aws_external``), as the
  AWS SDKs do. Temporary credentials are refreshed before they expire. The profile is
  ``$AWS_PROFILE``, else ``default``.
- STS endpoint (web identity): ``AWS_ENDPOINT_URL_STS``, ``AWS_ENDPOINT_URL``, the
  profile's ``endpoint_url``, else ``https://sts.REGION.amazonaws.com``.
- region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's ``region``, ``us-east-1``.
- endpoint: ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``
  (all ignored when ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true``); none means AWS itself.
- addressing style: the profile's nested ``s3 =`` block may say ``addressing_style =
  path | virtual | auto`` (as for the AWS CLI); ``auto`` is path-style for an explicit
  endpoint and virtual-hosted style on AWS (see ``cafs.stores.s3``).
- CA file: ``AWS_CA_BUNDLE``, ``CAFS_CA_FILE``, the profile's ``ca_bundle``; none means the
  system's trust store.

Raises ``UsageError`` for half a key pair in the environment, an ``AWS_PROFILE`` that
neither file has, an unreadable or malformed file, a credential helper or web identity
that gives no credentials, and a profile that names a way of getting credentials cafs
does not implement (SSO, ``role_arn`` with a ``source_profile``), even beside keys of its
own (the AWS SDKs would use the role, not the keys): say so rather than fall back to
anonymous requests, or another identity, that fail later as "access denied".

Secrets never leave ``Credentials`` (whose ``repr`` hides them); ``credentials_from``
says where they came from, for messages, without them.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cafs.errors import UsageError
from cafs.stores.aws_external import process_credentials, web_identity_credentials
from cafs.stores.aws_instance import RefreshingCredentials, instance_credentials
from cafs.stores.sigv4 import Credentials

DEFAULT_REGION = "us-east-1"
ADDRESSING_STYLES = ("auto", "path", "virtual")
_UNSUPPORTED = ("sso_session", "sso_start_url", "role_arn")  # role_arn: with a source_profile


@dataclass(frozen=True)
class S3Settings:
    credentials: Credentials | RefreshingCredentials | None = None
    credentials_from: str = ""  # where they came from, for messages: "the environment", ...
    region: str = DEFAULT_REGION
    endpoint_url: str | None = None
    addressing_style: str = "auto"
    ca_file: str | None = None


def s3_settings(env: Mapping[str, str] | None = None) -> S3Settings:
    """The settings that apply now, from ``env`` (default: the process environment) and
    the shared AWS files it points at."""
    env = dict(os.environ) if env is None else env
    profile = env.get("AWS_PROFILE") or "default"
    cred_path = _expand(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", env)
    conf_path = _expand(env.get("AWS_CONFIG_FILE") or "~/.aws/config", env)
    creds_file = _section(cred_path, [profile])
    conf_file = _section(conf_path, ["default", "profile default"] if profile == "default"
                         else [f"profile {profile}"])
    if env.get("AWS_PROFILE") and creds_file is None and conf_file is None:
        raise UsageError(f"AWS profile {profile!r} is in neither {cred_path} nor {conf_path}"
                         + _misnamed(profile, cred_path, conf_path))
    conf = conf_file or {}

    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or conf.get("region") or DEFAULT_REGION
    configured = env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true"
    endpoint = None
    sts = f"https://sts.{region}.amazonaws.com"
    if configured:
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or conf.get("endpoint_url")
        sts = env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL") or conf.get("endpoint_url") or sts
    credentials, source = _credentials(env, profile, sts, (cred_path, creds_file or {}), (conf_path, conf))
    style = _nested(conf.get("s3", "")).get("addressing_style", "auto")
    if style not in ADDRESSING_STYLES:
        raise UsageError(f"{conf_path}: profile {profile!r}: addressing_style must be one of "
                         f"{', '.join(ADDRESSING_STYLES)}, not {style!r}")
    return S3Settings(
        credentials=credentials, credentials_from=source,
        region=region,
        endpoint_url=endpoint or None, addressing_style=style,
        ca_file=env.get("AWS_CA_BUNDLE") or env.get("CAFS_CA_FILE") or conf.get("ca_bundle") or None)


def _credentials(env: Mapping[str, str], profile: str, sts: str, *files: tuple[Path, dict[str, str]]
                 ) -> tuple[Credentials | RefreshingCredentials | None, str]:
    key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if key_id or secret:
        if not (key_id and secret):
            missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
            raise UsageError(f"AWS credentials in the environment lack {missing}")
        return Credentials(key_id, secret, env.get("AWS_SESSION_TOKEN") or None), "the environment (AWS_ACCESS_KEY_ID)"
    web = _web_identity(env, profile, sts, files)
    if web is not None:
        return web, web.source
    for path, values in files:
        # before the profile's keys: the AWS SDKs assume the role (or use SSO) even where
        # the profile holds keys too (a role's source_profile may be the profile itself),
        # so those keys are not who the profile means to be
        other = [k for k in _UNSUPPORTED if values.get(k)]
        if other:
            raise UsageError(
                f"{path}: profile {profile!r} gets credentials by {other[0]}, which cafs does not "
                "implement; export them instead (aws configure export-credentials --format env)")
    for path, values in files:
        key_id, secret = values.get("aws_access_key_id"), values.get("aws_secret_access_key")
        if key_id or secret:
            if not (key_id and secret):
                raise UsageError(f"{path}: profile {profile!r} has only half of a key pair")
            token = values.get("aws_session_token") or values.get("aws_security_token") or None
            return Credentials(key_id, secret, token), f"profile {profile!r} in {path}"
    for path, values in files:
        if values.get("credential_process"):
            helper = process_credentials(values["credential_process"], f"profile {profile!r} in {path}")
            return helper, helper.source
    instance = instance_credentials(env)
    if instance is not None:
        return instance, instance.source
    return None, ""


def _web_identity(env: Mapping[str, str], profile: str, sts: str,
                  files: tuple[tuple[Path, dict[str, str]], ...]) -> RefreshingCredentials | None:
    """A role assumed with a web identity token: from ``AWS_ROLE_ARN`` and
    ``AWS_WEB_IDENTITY_TOKEN_FILE``, else from a profile's ``role_arn`` and
    ``web_identity_token_file``."""
    role, token_file = env.get("AWS_ROLE_ARN"), env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
    if role or token_file:
        if not (role and token_file):
            missing = "AWS_WEB_IDENTITY_TOKEN_FILE" if role else "AWS_ROLE_ARN"
            raise UsageError(f"a web identity in the environment lacks {missing}")
        return web_identity_credentials(role, token_file, env.get("AWS_ROLE_SESSION_NAME", ""), sts,
                                        "AWS_WEB_IDENTITY_TOKEN_FILE")
    for path, values in files:
        if values.get("web_identity_token_file"):
            if not values.get("role_arn"):
                raise UsageError(f"{path}: profile {profile!r} has a web_identity_token_file but no role_arn")
            return web_identity_credentials(values["role_arn"], values["web_identity_token_file"],
                                            values.get("role_session_name", ""), sts,
                                            f"profile {profile!r} in {path}")
    return None


def _section(path: Path, names: list[str]) -> dict[str, str] | None:
    parser = configparser.RawConfigParser(default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        why = " ".join(str(getattr(exc, "strerror", None) or exc).split())  # configparser's span lines
        raise UsageError(f"{path}: cannot read the AWS settings: {why}") from None
    for name in names:
        if parser.has_section(name):
            return {k: v.strip() for k, v in parser.items(name)}
    return None


def _misnamed(profile: str, cred_path: Path, conf_path: Path) -> str:
    """A hint for a profile whose section is named the other file's way (as the AWS CLI
    reads them: ``[NAME]`` in the credentials file, ``[profile NAME]`` in the config)."""
    if _section(conf_path, [profile]) is not None:
        return f" ({conf_path} has [{profile}]; the config file names it [profile {profile}])"
    if _section(cred_path, [f"profile {profile}"]) is not None:
        return f" ({cred_path} has [profile {profile}]; the credentials file names it [{profile}])"
    return ""


def _nested(block: str) -> dict[str, str]:
    """The ``key = value`` lines of a nested block such as ``s3 =\\n  addressing_style = path``."""
    out = {}
    for line in block.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _expand(path: str, env: Mapping[str, str]) -> Path:
    if path.startswith("~/") and env.get("HOME"):
        return Path(env["HOME"]) / path[2:]
    return Path(os.path.expanduser(path))

"""Open a store from one URL, so every service, the CLI and the Helm chart configure it the same way.

    /abs/path  or  file:///abs/path                      → LocalStore
    s3://bucket[/prefix]?endpoint=http://host:9000&...   → S3Store

S3 query options: `endpoint` (`http://` or `https://` picks TLS; a bare `host:port` uses `secure`,
default true; absent means AWS), `region`, `secure`, `access_key`, `secret_key`, `create_bucket`
(default true), `connect_timeout`, `read_timeout`, `retries`, `part_size`, `ca_bundle`. Credentials
left out of the URL come from `STAGETUNE_S3_ACCESS_KEY`/`STAGETUNE_S3_SECRET_KEY`, then
`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`), so secrets can live in a
Kubernetes Secret rather than in the URL. Unknown options are errors: a typo must not silently fall
back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from stagetune.core.errors import ConfigError
from stagetune.core.store.base import InvalidKeyError, Store, check_key, check_prefix
from stagetune.core.store.local import LocalStore

__all__ = [
    "InvalidKeyError",
    "Store",
    "LocalStore",
    "check_key",
    "check_prefix",
    "default_store_url",
    "open_store",
    "redact_url",
]

ENV_STORE = "STAGETUNE_STORE"

_S3_OPTIONS = {
    "endpoint",
    "region",
    "secure",
    "access_key",
    "secret_key",
    "create_bucket",
    "connect_timeout",
    "read_timeout",
    "retries",
    "part_size",
    "ca_bundle",
}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def default_store_url() -> str:
    """Where the embedded store lives when nothing is configured (printed by the CLI)."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    base = Path(cache) if cache and os.path.isabs(cache) else Path.home() / ".cache"
    return str(base / "stagetune" / "store")


def redact_url(url: str) -> str:
    """The URL with any `secret_key=` value hidden, for error messages and logs."""
    return re.sub(r"(?i)(secret_key=)[^&#]*", r"\1***", url)


def open_store(url: str | None = None) -> Store:
    """Build the store `url` names (else `$STAGETUNE_STORE`, else the default local folder)."""
    if url is None:
        url = os.environ.get(ENV_STORE) or default_store_url()
    url = url.strip()
    if not url:
        raise ConfigError("empty store URL", field="store")
    if "://" not in url:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) and not os.path.exists(url):
            raise ConfigError(
                f"store URL {redact_url(url)!r}: unknown form; use a path, file:///path or s3://bucket",
                field="store",
            )
        return LocalStore(Path(url).expanduser())
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"store URL {url!r}: a file URL names a local path (file:///abs/path), not {parts.netloc!r}",
                field="store",
            )
        if parts.query or not parts.path:
            raise ConfigError(f"store URL {url!r}: a file URL takes a path and no options", field="store")
        return LocalStore(Path(unquote(parts.path)))
    if scheme == "s3":
        return _open_s3(url, parts.netloc, parts.path, parts.query, parts.fragment)
    raise ConfigError(
        f"store URL {redact_url(url)!r}: unsupported scheme {parts.scheme!r} (use a path, file:// or s3://)",
        field="store",
    )


def _open_s3(url: str, bucket: str, path: str, query: str, fragment: str) -> Store:
    """The first problem is raised, checked in a fixed order (fragment, bucket, prefix, options, endpoint,
    credentials, the other options' values), its message naming the URL with the secret hidden."""
    from stagetune.core.store.s3 import S3Store  # keeps minio/urllib3 off the import path of local users

    shown = redact_url(url)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"store URL {shown!r}: {why}", field="store")

    if fragment:
        raise bad("unexpected '#' fragment")
    prefix = _s3_prefix(bucket, path, bad)
    opts = _s3_options(query, bad)
    host, secure = _s3_endpoint(opts, _flag(opts, "secure", bad), bad)
    access_key, secret_key, token = _credentials(opts, bad)
    create_bucket = _flag(opts, "create_bucket", bad)
    return S3Store(
        host,
        bucket,
        prefix=prefix,
        access_key=access_key,
        secret_key=secret_key,
        session_token=token,
        region=opts.get("region") or None,
        secure=secure,
        create_bucket=True if create_bucket is None else create_bucket,
        connect_timeout=_number(opts, "connect_timeout", float, 5.0, bad),
        read_timeout=_number(opts, "read_timeout", float, 60.0, bad),
        retries=int(_number(opts, "retries", int, 4, bad)),
        part_size=int(_number(opts, "part_size", int, 0, bad)),
        ca_bundle=opts.get("ca_bundle") or None,
    )


def _s3_prefix(bucket: str, path: str, bad: Callable[[str], ConfigError]) -> str:
    """The key prefix under the bucket; both are checked now, so a bad name fails before any request."""
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise bad(f"bucket name {bucket!r} is not a valid S3 bucket name (3-63 chars, a-z 0-9 . -)")
    prefix = unquote(path).strip("/")
    if prefix:
        try:
            check_prefix(prefix + "/")
        except InvalidKeyError as exc:
            raise bad(f"prefix {prefix!r} is not a valid key prefix") from exc
    return prefix


def _s3_options(query: str, bad: Callable[[str], ConfigError]) -> dict[str, str]:
    """Option → value; an unknown or repeated option is an error, never a silent default or a silent pick."""
    try:
        raw = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise bad(f"cannot parse the options: {exc}") from exc
    unknown = sorted(set(raw) - _S3_OPTIONS)
    if unknown:
        raise bad(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(_S3_OPTIONS))})")
    twice = sorted(k for k, v in raw.items() if len(v) > 1)
    if twice:
        raise bad(f"option(s) given twice: {', '.join(twice)}")
    return {k: v[0] for k, v in raw.items()}


def _flag(opts: dict[str, str], name: str, bad: Callable[[str], ConfigError]) -> bool | None:
    """None when not given, so the caller can tell "unset" from "false"."""
    if name not in opts:
        return None
    value = opts[name].lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise bad(f"option {name}={opts[name]!r} must be true or false")


def _number(
    opts: dict[str, str], name: str, kind: type[int] | type[float], default: float, bad: Callable[[str], ConfigError]
) -> float:
    """Timeouts, retries and part sizes: a negative one has no sensible meaning, so it is refused, not clamped."""
    if name not in opts:
        return default
    try:
        value = kind(opts[name])
    except ValueError as exc:
        raise bad(f"option {name}={opts[name]!r} must be a {kind.__name__}") from exc
    if value < 0:
        raise bad(f"option {name}={opts[name]!r} must not be negative")
    return value


def _s3_endpoint(
    opts: dict[str, str], secure: bool | None, bad: Callable[[str], ConfigError]
) -> tuple[str, bool]:
    """(host[:port], TLS or not). An endpoint's scheme decides TLS, and must agree with `secure` when both are
    given; without an endpoint it is AWS, over TLS unless `secure` says otherwise."""
    endpoint = opts.get("endpoint", "")
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        if ep.scheme not in ("", "http", "https"):
            raise bad(f"endpoint {endpoint!r} must be http://host[:port] or https://host[:port]")
        if ep.path.strip("/") or ep.query or not ep.hostname:
            raise bad(f"endpoint {endpoint!r} must be a host and port only (no path)")
        try:
            ep.port  # noqa: B018 - raises ValueError for a non-numeric port
        except ValueError as exc:
            raise bad(f"endpoint {endpoint!r} has an invalid port") from exc
        if ep.scheme:
            if secure is not None and secure != (ep.scheme == "https"):
                raise bad(f"secure={opts['secure']} contradicts endpoint scheme {ep.scheme}://")
            secure = ep.scheme == "https"
        host = ep.netloc
    else:
        host = "s3.amazonaws.com"
    if secure is None:
        secure = True
    return host, secure


def _credentials(
    opts: dict[str, str], bad: Callable[[str], ConfigError]
) -> tuple[str | None, str | None, str | None]:
    """URL first, then stagetune's variables, then the AWS ones; a half pair is an error, not anonymous."""
    sources = [
        ("the URL", opts.get("access_key"), opts.get("secret_key"), None),
        (
            "STAGETUNE_S3_ACCESS_KEY/STAGETUNE_S3_SECRET_KEY",
            os.environ.get("STAGETUNE_S3_ACCESS_KEY"),
            os.environ.get("STAGETUNE_S3_SECRET_KEY"),
            None,
        ),
        (
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            os.environ.get("AWS_ACCESS_KEY_ID"),
            os.environ.get("AWS_SECRET_ACCESS_KEY"),
            os.environ.get("AWS_SESSION_TOKEN") or None,
        ),
    ]
    for where, access, secret, token in sources:
        if access or secret:
            if not (access and secret):
                raise bad(f"{where} gives only one of the access key and the secret key")
            return access, secret, token
    return None, None, None  # anonymous: public buckets; a refusal later says no credentials were given

"""Where a dataset's images live: a local folder or an S3 prefix, behind one small interface.

SimpleTuner lists an `aws` dataset by paging through the *whole bucket* and then checks captions and
caches with one HEAD per key, which costs minutes and money on a bucket of millions of objects. Here
an S3 dataset is listed once, by its `aws_data_prefix`, with ListObjectsV2 pages of 1,000 keys; the
listing keeps every key it saw (images and their `.txt` captions alike), so "is there a caption?"
is answered from memory and only captions that exist are fetched.

The S3 side reuses the store's `S3Store` (its minio client, timeouts, retry loop and error mapping),
so a dataset bucket that is down reads as `StoreUnavailableError` naming the endpoint, exactly as
the store does, and credentials never reach a message: only the dataset id, bucket, prefix and
endpoint are ever printed.
"""

from __future__ import annotations

import os
import posixpath
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from stagetune.core.discovery import discover_images, is_image_name
from stagetune.core.errors import (
    ConfigError,
    InputError,
    NotFoundError,
    NotSupportedError,
    StagetuneError,
)
from stagetune.core.store.base import InvalidKeyError, check_prefix

DEFAULT_MAX_POOL_CONNECTIONS = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SourceFile:
    """One image as a listing saw it: enough to detect a change without reading it."""

    path: str  # absolute local path, or s3://bucket/key: the manifest row's `path`
    relative: str  # '/'-separated, relative to the dataset root or prefix
    size: int
    mtime_ns: int  # local st_mtime_ns, or S3 LastModified in ns since the epoch
    etag: str | None = None  # S3 ETag without quotes; None for local files


@runtime_checkable
class Source(Protocol):
    """What ingest and the VAE stage need from a dataset location."""

    url: str
    #: Concurrent reads worth having: S3 is latency-bound, a local file system is not (threads only
    #: contend for the GIL when the files are in the page cache).
    read_workers: int

    def list_files(self) -> list[SourceFile]:
        """Images only, recursive, sorted by relative path."""
        ...

    def read(self, path: str) -> bytes:
        """The whole file or object; NotFoundError / StoreUnavailableError naming it."""
        ...

    def read_text(self, path: str) -> str | None:
        """A small text file (a caption) decoded as UTF-8, or None when there is none."""
        ...

    def sibling(self, path: str, suffix: str) -> str:
        """The path of `image.png`'s `image<suffix>` in the same folder of the same source."""
        ...


def _sibling(path: str, suffix: str) -> str:
    # SimpleTuner's rule: os.path.splitext(path)[0] + ".txt"; posixpath so s3:// paths split the same way.
    return posixpath.splitext(path)[0] + suffix


def _decode_text(data: bytes, where: str) -> str:
    """UTF-8 with an optional BOM (editors on Windows add one); anything else is the user's to fix."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text ({exc})", field=where) from exc


def _hidden(relative: str) -> bool:
    """Same rule as local discovery: names or folders starting with '.' are not dataset files."""
    return any(part.startswith(".") for part in relative.split("/"))


# -- local folders ------------------------------------------------------------------------------------


class LocalSource:
    """A dataset folder on a local (or mounted) file system."""

    read_workers = 1

    def __init__(self, root: str | os.PathLike[str], *, dataset_id: str | None = None) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        self.dataset_id = dataset_id

    def __repr__(self) -> str:
        return f"LocalSource({self.url!r})"

    def _label(self) -> str:
        return f"dataset {self.dataset_id!r}" if self.dataset_id else f"dataset at {self.url}"

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.url, path)

    def list_files(self) -> list[SourceFile]:
        return [
            SourceFile(path=str(f.path), relative=f.relative_path, size=f.size, mtime_ns=f.mtime_ns)
            for f in discover_images(self.root)
        ]

    def read(self, path: str) -> bytes:
        target = self._resolve(path)
        try:
            with open(target, "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFoundError(f"{self._label()}: no such file {target}", field=str(target)) from exc
        except OSError as exc:
            raise InputError(f"{self._label()}: cannot read {target}: {exc}", field=str(target)) from exc

    def read_optional(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist (a missing caption is not an error)."""
        try:
            return self.read(path)
        except NotFoundError:
            return None

    def read_text(self, path: str) -> str | None:
        data = self.read_optional(path)
        return None if data is None else _decode_text(data, self._resolve(path))

    def sibling(self, path: str, suffix: str) -> str:
        return _sibling(self._resolve(path), suffix)

    def read_many(self, paths: Iterable[str], max_workers: int = 8) -> Iterator[tuple[str, bytes | Exception]]:
        return read_many(self, paths, max_workers=max_workers)

    def close(self) -> None:
        """Nothing held; here so callers can close any source."""


# -- S3 prefixes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Listed:
    size: int
    etag: str | None
    mtime_ns: int


def _mtime_ns(when: datetime | None) -> int:
    """Exact integer ns (no float rounding), so the same LastModified always gives the same stamp."""
    if when is None:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _parse_endpoint(endpoint_url: str | None, where: str) -> tuple[str, bool]:
    """`aws_endpoint_url` as SimpleTuner users write it (`https://host[:port]/`) → (host:port, secure)."""
    if not endpoint_url:
        return "s3.amazonaws.com", True
    raw = endpoint_url.strip()
    parts = urlsplit(raw if "://" in raw else f"//{raw}")
    if parts.scheme not in ("", "http", "https"):
        raise ConfigError(
            f"{where}: aws_endpoint_url {raw!r} must be http://host[:port] or https://host[:port]",
            field="aws_endpoint_url",
        )
    if parts.path.strip("/") or parts.query or not parts.hostname or parts.username or parts.password:
        raise ConfigError(
            f"{where}: aws_endpoint_url {parts.scheme or 'https'}://{parts.hostname or ''}… must be a scheme, "
            "host and port only (no path, query or user info)",
            field="aws_endpoint_url",
        )
    try:
        parts.port  # noqa: B018 - raises ValueError for a non-numeric port
    except ValueError as exc:
        raise ConfigError(f"{where}: aws_endpoint_url {raw!r} has an invalid port", field="aws_endpoint_url") from exc
    return parts.netloc, parts.scheme != "http"


def _normalise_prefix(prefix: str | None, where: str) -> str:
    """A prefix names a folder: `images` lists `images/…`, never `images2/…` beside it."""
    value = (prefix or "").strip().lstrip("/")
    if not value:
        return ""
    value = value.rstrip("/") + "/"
    try:
        check_prefix(value)
    except InvalidKeyError as exc:
        raise ConfigError(
            f"{where}: aws_data_prefix {prefix!r} is not a usable prefix ({exc})", field="aws_data_prefix"
        ) from exc
    return value


class S3Source:
    """A dataset under one prefix of one bucket, on AWS or any S3 endpoint."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str | None = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
        dataset_id: str | None = None,
        retries: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        """Builds the client without touching the network; the first listing or read does."""
        from minio.helpers import check_bucket_name

        from stagetune.core.store.s3 import S3Store  # keeps minio off local-only import paths

        self.dataset_id = dataset_id
        self.read_workers = max(1, min(16, max_pool_connections))
        label = f"dataset {dataset_id!r}" if dataset_id else "S3 dataset"
        if not bucket or not isinstance(bucket, str):
            raise ConfigError(f"{label}: aws_bucket_name is required for type 'aws'", field="aws_bucket_name")
        try:
            check_bucket_name(bucket, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{label}: aws_bucket_name {bucket!r}: {exc}", field="aws_bucket_name") from exc
        if bool(access_key) != bool(secret_key):
            names = ("aws_access_key_id", "aws_secret_access_key")
            given, missing = names if access_key else names[::-1]
            raise ConfigError(f"{label}: {given} is set but {missing} is not", field=missing)
        host, secure = _parse_endpoint(endpoint_url, label)
        self.bucket = bucket
        self.prefix = _normalise_prefix(prefix, label)
        scheme = "https" if secure else "http"
        self.endpoint = f"{scheme}://{host}"
        self.url = f"s3://{bucket}/{self.prefix} (endpoint {self.endpoint})"
        self._label = f"{label} (s3://{bucket}/{self.prefix} at {self.endpoint})"
        self.store = S3Store(
            host,
            bucket,
            access_key=access_key or None,
            secret_key=secret_key or None,
            session_token=session_token or None,
            region=region or None,
            secure=secure,
            create_bucket=False,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries=retries,
            max_pool_connections=max(1, int(max_pool_connections)),
        )
        self._client = self.store._client  # one pooled, thread-safe client shared by every read
        #: Every key under the prefix from the last listing (images, captions, anything), or None before one.
        self._listing: dict[str, _Listed] | None = None

    def __repr__(self) -> str:
        return f"S3Source({self.url!r})"

    # -- plumbing ---------------------------------------------------------------------------------

    def _named(self, exc: StagetuneError) -> StagetuneError:
        """The store's error with the dataset in front, same type, so gRPC codes stay right."""
        named = type(exc)(f"{self._label}: {exc}", field=exc.field)
        named.__cause__ = exc.__cause__
        return named

    def _key(self, path: str) -> str:
        """`s3://bucket/key` (as rows carry it) or a path relative to the prefix → the object's key."""
        if path.startswith("s3://"):
            bucket, _, key = path[5:].partition("/")
            if bucket != self.bucket or not key:
                raise InputError(f"{self._label}: {path!r} is not an object of bucket {self.bucket!r}", field=path)
            return key
        if not path or path.startswith("/"):
            raise InputError(f"{self._label}: {path!r} is neither s3://{self.bucket}/… nor relative", field=path)
        return self.prefix + path

    def path_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    # -- listing --------------------------------------------------------------------------------

    def list_files(self) -> list[SourceFile]:
        """One paginated ListObjectsV2 over the prefix; no HEAD per key, never the whole bucket when prefixed."""
        listing: dict[str, _Listed] = {}
        files: list[SourceFile] = []
        strip = len(self.prefix)
        try:
            for key, obj in self.store.list_entries(self.prefix):
                etag = obj.etag.strip('"') if obj.etag else None
                entry = _Listed(size=int(obj.size or 0), etag=etag, mtime_ns=_mtime_ns(obj.last_modified))
                listing[key] = entry
                relative = key[strip:]
                if not relative or _hidden(relative) or not is_image_name(relative):
                    continue
                files.append(
                    SourceFile(
                        path=self.path_of(key),
                        relative=relative,
                        size=entry.size,
                        mtime_ns=entry.mtime_ns,
                        etag=etag,
                    )
                )
            if not listing:
                # S3Store lists a missing bucket as empty (a store not yet written); a dataset must exist.
                exists = self.store._call("check bucket", None, lambda: self._client.bucket_exists(self.bucket))
                if not exists:
                    raise NotFoundError(f"bucket {self.bucket!r} does not exist", field="aws_bucket_name")
        except StagetuneError as exc:
            raise self._named(exc) from exc.__cause__
        files.sort(key=lambda f: f.relative)
        self._listing = listing
        return files

    # -- reads ----------------------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        key = self._key(path)

        def get() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        try:
            return self.store._call("read", key, get)
        except StagetuneError as exc:
            raise self._named(exc) from exc.__cause__

    def read_optional(self, path: str) -> bytes | None:
        """Bytes, or None when absent; keys under a listed prefix are answered from the listing, not a request."""
        key = self._key(path)
        listing = self._listing
        if listing is not None and key.startswith(self.prefix) and key not in listing:
            return None
        try:
            return self.read(path)
        except NotFoundError:
            return None  # deleted since the listing, or not listed yet

    def read_text(self, path: str) -> str | None:
        data = self.read_optional(path)
        return None if data is None else _decode_text(data, self.path_of(self._key(path)))

    def sibling(self, path: str, suffix: str) -> str:
        return _sibling(path if path.startswith("s3://") else self.path_of(self._key(path)), suffix)

    def read_many(self, paths: Iterable[str], max_workers: int = 8) -> Iterator[tuple[str, bytes | Exception]]:
        return read_many(self, paths, max_workers=max_workers)

    def close(self) -> None:
        self.store.close()


# -- parallel reads -----------------------------------------------------------------------------------


def read_many(source: Source, paths: Iterable[str], max_workers: int = 8) -> Iterator[tuple[str, bytes | Exception]]:
    """Read many files with a thread pool, yielding `(path, bytes or the error)` in the order given.

    Many small objects are latency-bound on S3, so reads overlap; at most `2 × max_workers` are in flight
    or buffered, so a 100k-image dataset never sits in memory at once. One failed file is yielded as its
    exception rather than raised: a corrupt or vanished file is reported, not fatal.
    """
    if max_workers <= 1:
        for path in paths:
            try:
                yield path, source.read(path)
            except Exception as exc:  # noqa: BLE001 - handed to the caller to report
                yield path, exc
        return

    def outcome(future: Future[bytes]) -> bytes | Exception:
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - handed to the caller to report
            return exc

    window = 2 * max_workers
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="stagetune-read")
    pending: deque[tuple[str, Future[bytes]]] = deque()
    try:
        for path in paths:
            pending.append((path, pool.submit(source.read, path)))
            if len(pending) >= window:
                done_path, future = pending.popleft()
                yield done_path, outcome(future)
        while pending:
            done_path, future = pending.popleft()
            yield done_path, outcome(future)
    finally:
        # A caller that stops early must not wait for (or pay for) reads it will never look at.
        pool.shutdown(wait=True, cancel_futures=True)


# -- from a dataset entry -----------------------------------------------------------------------------


def _getter(dataset: Any) -> Any:
    if isinstance(dataset, Mapping):
        return lambda name: dataset.get(name)
    return lambda name: getattr(dataset, name, None)


def source_for(dataset: Any) -> Source:
    """The source a `multidatabackend.json` entry (DatasetConfig or plain dict) names.

    `aws_*` keys are read by name because SimpleTuner users bring them unchanged; credentials left out
    come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, as boto3 would find them.
    """
    get = _getter(dataset)
    dataset_id = get("id")
    label = f"dataset {dataset_id!r}" if dataset_id else "dataset"
    raw_kind = get("type") or "local"
    kind = raw_kind.strip().lower() if isinstance(raw_kind, str) else raw_kind
    if kind == "local":
        root = get("instance_data_dir")
        if not root:
            raise ConfigError(f"{label}: instance_data_dir is required for type 'local'", field="instance_data_dir")
        return LocalSource(root, dataset_id=dataset_id)
    if kind == "aws":
        access_key = get("aws_access_key_id")
        secret_key = get("aws_secret_access_key")
        token = get("aws_session_token")
        if not access_key and not secret_key:
            access_key = os.environ.get("AWS_ACCESS_KEY_ID") or None
            secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
            token = token or os.environ.get("AWS_SESSION_TOKEN") or None
            if bool(access_key) != bool(secret_key):
                raise ConfigError(
                    f"{label}: the environment sets only one of AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                    field="aws_access_key_id",
                )
        pool = get("aws_max_pool_connections")
        try:
            pool_size = DEFAULT_MAX_POOL_CONNECTIONS if pool is None else int(pool)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{label}: aws_max_pool_connections {pool!r} must be a whole number", field="aws_max_pool_connections"
            ) from exc
        if pool_size < 1:
            raise ConfigError(
                f"{label}: aws_max_pool_connections must be at least 1, not {pool_size}",
                field="aws_max_pool_connections",
            )
        region = get("aws_region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return S3Source(
            get("aws_bucket_name"),
            prefix=get("aws_data_prefix"),
            endpoint_url=get("aws_endpoint_url"),
            region=region or None,
            access_key=access_key,
            secret_key=secret_key,
            session_token=token,
            max_pool_connections=pool_size,
            dataset_id=dataset_id,
        )
    raise NotSupportedError(
        f"{label}: type {kind!r} is not supported as an image source (use 'local' or 'aws')", field="type"
    )


__all__ = [
    "DEFAULT_MAX_POOL_CONNECTIONS",
    "LocalSource",
    "S3Source",
    "Source",
    "SourceFile",
    "read_many",
    "source_for",
]

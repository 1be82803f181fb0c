"""The store on any S3 endpoint (MinIO, SeaweedFS, Ceph RGW, cloud S3) through the `minio` client.

S3 writes are atomic by themselves: a single PUT or a multipart upload becomes visible only when it
completes, so no temp-key dance is needed. What S3 adds is the network: every call goes through
`_call`, which retries connection errors and throttling with exponential backoff and then reports a
`StoreUnavailableError` naming the endpoint, so an outage reads as "store down, retry" and never as
a missing object or a traceback from urllib3.
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Object
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from stagetune.core import metrics
from stagetune.core.errors import ConfigError, NotFoundError, StagetuneError, StoreUnavailableError
from stagetune.core.store.base import Store, check_key, check_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

_NOT_FOUND_KEY = {"NoSuchKey", "NoSuchObject", "ResourceNotFound", "NotFound"}
_TRANSIENT = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "OperationAborted",
    "XMinioServerNotInitialized",
}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_BUCKET_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


class S3Store(Store):
    """Objects at `<bucket>/<prefix><key>` on one S3 endpoint."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        prefix: str = "",
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        region: str | None = None,
        secure: bool = True,
        create_bucket: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.25,
        part_size: int = 0,
        ca_bundle: str | None = None,
        max_pool_connections: int = 16,
    ) -> None:
        """`endpoint` is `host:port`; `part_size` 0 lets minio pick (5 MiB parts above 5 MiB objects).

        `max_pool_connections` bounds the connections kept per host: size it to the threads that read at once.
        """
        if prefix:
            check_prefix(prefix)
            prefix = prefix.rstrip("/") + "/"
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix
        self.secure = secure
        self.create_bucket = create_bucket
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.part_size = part_size
        self.anonymous = access_key is None
        scheme = "https" if secure else "http"
        self.url = f"s3://{bucket}/{prefix}?endpoint={scheme}://{endpoint}"
        # Our own retry loop owns retries (so it can name the endpoint and resume listings);
        # urllib3 must fail fast, within the timeouts given.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            retries=False,
            maxsize=max(1, int(max_pool_connections)),
            cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
            ca_certs=ca_bundle or os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            session_token=session_token,
            secure=secure,
            region=region,
            http_client=http,
        )
        self._bucket_checked = False
        self._bucket_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------------

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _where(self) -> str:
        return f"S3 endpoint {'https' if self.secure else 'http'}://{self.endpoint} (bucket {self.bucket!r})"

    def _call(self, what: str, key: str | None, fn: Callable[[], T]) -> T:
        """Run one S3 operation, retrying transient failures with exponential backoff."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except (MinioException, *_CONNECTION_ERRORS) as exc:
                if attempt == self.retries or not _transient(exc):
                    if not (isinstance(exc, S3Error) and exc.code in _NOT_FOUND_KEY):  # a miss is no error
                        metrics.STORE_ERRORS.labels(what.split()[0]).inc()
                    raise self._error(what, key, exc, attempt + 1) from exc
                sleep = delay * (1 + random.random() / 2)
                log.warning("%s: %s failed (%s), retrying in %.2fs", self._where(), what, _reason(exc), sleep)
                time.sleep(sleep)
                delay *= 2
        raise AssertionError("unreachable")

    def _error(self, what: str, key: str | None, exc: BaseException, attempts: int) -> StagetuneError:
        """Translate a client failure into an error a user can act on, naming the key or endpoint."""
        subject = f"{what} {key!r}" if key is not None else what
        if isinstance(exc, S3Error):
            if exc.code in _NOT_FOUND_KEY and key is not None:
                return NotFoundError(f"no object {key!r} in store {self.url}", field="key")
            if exc.code == "NoSuchBucket":
                return NotFoundError(
                    f"bucket {self.bucket!r} does not exist at {self._where()} (while trying to {subject})",
                    field="bucket",
                )
            if exc.code in _AUTH:
                hint = "no credentials were given" if self.anonymous else "check the access and secret key"
                return ConfigError(
                    f"{self._where()} refused to {subject} ({exc.code}): {hint}", field="store"
                )
            return StagetuneError(f"{self._where()} failed to {subject}: {exc.code}: {exc.message}")
        if isinstance(exc, ServerError | InvalidResponseError):
            return StoreUnavailableError(
                f"{self._where()} answered badly to {subject} after {attempts} attempt(s)"
                f" (is it an S3 server?): {exc}"
            )
        return StoreUnavailableError(
            f"cannot reach {self._where()} to {subject} after {attempts} attempt(s): {_reason(exc)}"
        )

    def _ensure_bucket(self) -> None:
        """Check (and create) the bucket once, lazily, so building a store never touches the network."""
        if self._bucket_checked:
            return
        with self._bucket_lock:
            if self._bucket_checked:
                return
            exists = self._call("check bucket", None, lambda: self._client.bucket_exists(self.bucket))
            if not exists:
                if not self.create_bucket:
                    raise NotFoundError(
                        f"bucket {self.bucket!r} does not exist at {self._where()} and create_bucket is off",
                        field="bucket",
                    )
                try:
                    self._call("create bucket", None, lambda: self._client.make_bucket(self.bucket))
                    log.info("created bucket %r at %s", self.bucket, self._where())
                except StagetuneError as exc:
                    cause = exc.__cause__
                    if not (isinstance(cause, S3Error) and cause.code in _BUCKET_EXISTS):
                        raise  # another process creating it at the same time is fine
            self._bucket_checked = True

    # -- writes ---------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:  # S3 puts are durable
        name = self._object(key)
        self._ensure_bucket()
        view = memoryview(data)

        def put() -> Any:
            return self._client.put_object(
                self.bucket, name, io.BytesIO(view), len(view), part_size=self.part_size
            )

        self._call("write", key, put)
        metrics.STORE_BYTES.labels("write").inc(len(view))

    def put_file(self, key: str, path: Path) -> None:
        name = self._object(key)
        source = Path(path)
        if not source.is_file():
            raise NotFoundError(f"cannot upload {source}: no such file", field="path")
        self._ensure_bucket()
        self._call(
            "upload",
            key,
            lambda: self._client.fput_object(self.bucket, name, str(source), part_size=self.part_size),
        )
        metrics.STORE_BYTES.labels("write").inc(source.stat().st_size)

    # -- reads ----------------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        name = self._object(key)

        def get() -> bytes:
            response = self._client.get_object(self.bucket, name)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        data = self._call("read", key, get)
        metrics.STORE_BYTES.labels("read").inc(len(data))
        return data

    def get_file(self, key: str, path: Path) -> None:
        """Download through minio's `<file>.<etag>.part_minio` temp file, renamed when complete."""
        name = self._object(key)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", key, lambda: self._client.fget_object(self.bucket, name, str(target)))
        metrics.STORE_BYTES.labels("read").inc(target.stat().st_size)

    def size(self, key: str) -> int | None:
        name = self._object(key)

        def stat() -> int | None:
            try:
                return int(self._client.stat_object(self.bucket, name).size)
            except S3Error as exc:
                if exc.code in _NOT_FOUND_KEY or exc.code == "NoSuchBucket":
                    return None
                raise

        return self._call("check", key, stat)

    def exists(self, key: str) -> bool:
        name = self._object(key)

        def stat() -> bool:
            try:
                self._client.stat_object(self.bucket, name)
            except S3Error as exc:
                if exc.code in _NOT_FOUND_KEY or exc.code == "NoSuchBucket":
                    return False
                raise
            return True

        return self._call("check", key, stat)

    def list(self, prefix: str) -> Iterator[str]:
        for key, _obj in self.list_entries(prefix):
            yield key

    def list_entries(self, prefix: str) -> Iterator[tuple[str, Object]]:
        """Paginated ListObjectsV2 under `<store prefix><prefix>`; resumes after the last key on errors.

        Yields each key with its listing entry (size, ETag, LastModified), so callers that need those
        never pay a HEAD per key.
        """
        check_prefix(prefix)
        full = self.prefix + prefix
        strip = len(self.prefix)
        last: str | None = None
        delay = self.backoff
        attempt = 0
        while True:
            try:
                for obj in self._client.list_objects(
                    self.bucket, prefix=full or None, recursive=True, start_after=last
                ):
                    name = obj.object_name
                    if name is None or obj.is_dir or name.endswith("/"):
                        continue
                    last = name
                    attempt = 0
                    yield name[strip:], obj
                return
            except (MinioException, *_CONNECTION_ERRORS) as exc:
                if isinstance(exc, S3Error) and exc.code == "NoSuchBucket":
                    return  # nothing was ever written here
                if attempt >= self.retries or not _transient(exc):
                    raise self._error("list", prefix, exc, attempt + 1) from exc
            attempt += 1
            time.sleep(delay * (1 + random.random() / 2))
            delay *= 2

    # -- deletes --------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        name = self._object(key)

        def remove() -> None:
            try:
                self._client.remove_object(self.bucket, name)
            except S3Error as exc:
                if exc.code not in _NOT_FOUND_KEY and exc.code != "NoSuchBucket":
                    raise

        self._call("delete", key, remove)

    def delete_prefix(self, prefix: str) -> None:
        """Batch deletes (up to 1000 keys a request) instead of one request per key."""
        if not prefix:
            super().delete_prefix(prefix)  # raises: an empty prefix would wipe the store
        batch: list[str] = []
        for key in self.list(prefix):
            batch.append(self.prefix + key)
            if len(batch) == 1000:
                self._delete_batch(batch)
                batch = []
        if batch:
            self._delete_batch(batch)

    def _delete_batch(self, names: list[str]) -> None:
        def remove() -> None:
            errors = list(self._client.remove_objects(self.bucket, [DeleteObject(n) for n in names]))
            failed = [e for e in errors if e.code not in _NOT_FOUND_KEY]
            if failed:
                first = failed[0]
                raise StagetuneError(
                    f"{self._where()} failed to delete {len(failed)} object(s), first {first.name!r}: "
                    f"{first.code}: {first.message}"
                )

        self._call("delete objects", None, remove)

    def close(self) -> None:
        self._client._http.clear()  # type: ignore[attr-defined]


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the network, throttling and 5xx, never a missing key or bad credentials."""
    if isinstance(exc, S3Error):
        return exc.code in _TRANSIENT
    if isinstance(exc, ServerError):
        return exc.status_code >= 500 or exc.status_code == 429
    return True


def _reason(exc: BaseException) -> str:
    """urllib3 nests the useful part (`Connection refused`) inside MaxRetryError/NewConnectionError."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason is not None else f"{type(exc).__name__}: {exc}"

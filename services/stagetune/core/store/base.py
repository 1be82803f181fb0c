"""The object store every stage reads and writes.

One interface, two implementations (local folder, S3 through `minio`). Keys are `/`-separated
relative paths such as `cache/vae/<fingerprint>/shards/<id>.safetensors`. Every write is atomic:
a reader sees the whole old object, the whole new one, or none, never half a file. That is what
lets a killed encoder or trainer leave the store valid.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from pathlib import Path

from stagetune.core.errors import InputError


class InvalidKeyError(InputError):
    """A key that could escape the store's root or mean different objects on different stores."""


def check_key(key: str) -> str:
    """Reject keys a local folder and an S3 bucket would not treat alike.

    `a//b`, `./a`, `a/../b` or `/a` name one file on disk but different (or escaping) objects on S3,
    so they are refused everywhere rather than normalised silently.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid store key {key!r}: must be a non-empty string", field="key")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(
            f"invalid store key {key!r}: must be relative and not end with '/'", field="key"
        )
    if "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"invalid store key {key!r}: no backslashes or NUL bytes", field="key")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(
                f"invalid store key {key!r}: empty, '.' and '..' path components are not allowed", field="key"
            )
    return key


def check_prefix(prefix: str) -> str:
    """Prefixes follow key rules but may be empty or end with `/` (S3 prefixes are plain string prefixes)."""
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"invalid store prefix {prefix!r}: must be a string", field="prefix")
    if prefix:
        check_key(prefix[:-1] if prefix.endswith("/") and len(prefix) > 1 else prefix)
    return prefix


class Store(abc.ABC):
    """A flat key → bytes store with prefix listing."""

    #: Human-readable location, printed by the CLI (`/home/u/.cache/stagetune/store`, `s3://b?endpoint=…`).
    url: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Write `data` at `key` atomically, replacing any object there.

        `durable=False` is for coordination objects that are rewritten constantly and whose loss in a
        power cut is harmless (lease claims, done markers): a local store then skips the fsync.
        """

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; `NotFoundError` naming the key if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """Bytes in the object, or None if absent, without reading it (checkpoint completeness checks)."""
        return len(self.get_bytes(key)) if self.exists(key) else None

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix` (recursive), sorted. Never lists the whole bucket: callers pass a prefix."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; no error if it is already gone."""

    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file atomically (implementations may stream it)."""
        self.put_bytes(key, Path(path).read_bytes())

    def get_file(self, key: str, path: Path) -> None:
        """Download to a local file, atomically on the local side."""
        from stagetune.core.atomic import atomic_write_bytes

        atomic_write_bytes(Path(path), self.get_bytes(key))

    def local_path(self, key: str) -> Path | None:
        """A path to read the object in place (zero-copy), when the store is a local folder."""
        return None

    def delete_prefix(self, prefix: str) -> None:
        """Remove every key under `prefix`; an empty prefix is refused so a typo cannot wipe the store."""
        if not prefix:
            raise InvalidKeyError("delete_prefix needs a non-empty prefix", field="prefix")
        for key in list(self.list(prefix)):
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release connections or handles; the store must not be used afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

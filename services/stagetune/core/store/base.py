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


class Store(abc.ABC):
    """A flat key → bytes store with prefix listing."""

    #: Human-readable location, printed by the CLI (`/home/u/.cache/stagetune/store`, `s3://b?endpoint=…`).
    url: str

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` at `key` atomically, replacing any object there."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read the whole object; `NotFoundError` naming the key if absent."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

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
        for key in list(self.list(prefix)):
            self.delete(key)

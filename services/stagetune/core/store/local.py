"""The embedded store: a folder on a local (or shared POSIX) file system.

Each object is one file at `<root>/<key>`. Writes go to a temp file in the target folder, are fsynced
and renamed over the target, so a killed writer leaves either the old file or the new one plus, at
worst, a temp file that listings ignore. Readers can therefore memory-map objects in place
(`local_path`) without ever seeing half a shard.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from stagetune.core.atomic import atomic_write
from stagetune.core.errors import InputError, NotFoundError, NotWritableError
from stagetune.core.store.base import InvalidKeyError, Store, check_key, check_prefix

#: Temp files start with this; keys whose last component starts with it are refused so a listing
#: that hides temp files never hides a real object.
TMP_PREFIX = ".stagetune-tmp-"

_COPY_CHUNK = 8 * 1024 * 1024


class LocalStore(Store):
    """Objects as files under `root`; the folder is created on first write."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        # fsync makes a write survive power loss, not just a killed process; tests may turn it off.
        self.fsync = fsync

    # -- keys -----------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
            raise InvalidKeyError(f"invalid store key {key!r}: names starting {TMP_PREFIX!r} are reserved")
        return self.root / key

    # -- writes ---------------------------------------------------------------------------------

    def _write_atomic(self, key: str, fill: Callable[[BinaryIO], object], *, fsync: bool = True) -> None:
        try:
            atomic_write(self._path(key), fill, fsync=self.fsync and fsync, tmp_prefix=TMP_PREFIX)
        except (NotADirectoryError, FileExistsError) as exc:
            raise InputError(
                f"cannot store {key!r} in {self.url}: a parent of it is an object, not a folder", field="key"
            ) from exc
        except IsADirectoryError as exc:
            raise InputError(
                f"cannot store {key!r} in {self.url}: it is a folder of other objects", field="key"
            ) from exc
        except PermissionError as exc:
            raise NotWritableError(
                f"cannot write {self.url}: permission denied at {exc.filename or self.root} (a read-only folder, "
                "or another user's?)", field="store"
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
                raise NotWritableError(
                    f"cannot write {self.url}: {exc.strerror} at {exc.filename or self.root}", field="store"
                ) from exc
            raise

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self._write_atomic(key, lambda handle: handle.write(data), fsync=durable)

    def put_file(self, key: str, path: Path) -> None:
        source = Path(path)
        if not source.is_file():
            raise NotFoundError(f"cannot upload {source}: no such file", field="path")

        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, handle, _COPY_CHUNK)

        self._write_atomic(key, copy)

    # -- reads ----------------------------------------------------------------------------------

    def _not_found(self, key: str) -> NotFoundError:
        return NotFoundError(f"no object {key!r} in store {self.url}", field="key")

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise self._not_found(key) from exc

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise self._not_found(key)

        def copy(handle: BinaryIO) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, handle, _COPY_CHUNK)

        atomic_write(Path(path), copy, fsync=False)

    def size(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size if self._path(key).is_file() else None
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def local_path(self, key: str) -> Path:
        """The file an object lives in (whether or not it exists yet), for zero-copy reads."""
        return self._path(key)

    def list(self, prefix: str) -> Iterator[str]:
        check_prefix(prefix)
        # Walk only the deepest folder the prefix names; the rest of the prefix filters names.
        folder, _, _ = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return iter(())
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            rel = "" if rel == "." else rel + "/"
            # Prune folders that cannot contain a matching key.
            dirnames[:] = [d for d in dirnames if _may_match(rel + d + "/", prefix)]
            for name in filenames:
                if name.startswith(TMP_PREFIX):
                    continue
                key = rel + name
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return iter(keys)

    # -- deletes --------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except IsADirectoryError:
            pass  # a folder of other objects, not an object: nothing to delete under this key

    def delete_prefix(self, prefix: str) -> None:
        super().delete_prefix(prefix)
        # Tidy folders left empty; a concurrent writer re-creates its folder (see _write_atomic).
        folder = prefix.rpartition("/")[0]
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return
        for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
            rel = os.path.relpath(dirpath, self.root).replace(os.sep, "/") + "/"
            if rel != "./" and rel.startswith(prefix):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass


def _may_match(folder: str, prefix: str) -> bool:
    """Whether keys under `folder` (ending in `/`) can start with `prefix`."""
    return folder.startswith(prefix) or prefix.startswith(folder)

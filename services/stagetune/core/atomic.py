"""Atomic local writes: temp file in the same folder, fsync, rename.

A reader sees the old file, the new file, or no file, never half of one: what lets a killed process
leave caches and checkpoints valid. The local store and every other local writer use this.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: Path, fill: Callable[[BinaryIO], object], *, fsync: bool = True,
                 tmp_prefix: str | None = None) -> None:
    """Write `path` through `fill(handle)`; on any error the temp file goes and `path` is untouched."""
    path = Path(path)
    for attempt in range(3):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
            break
        except FileNotFoundError:
            # A concurrent delete removed the (empty) folder between mkdir and mkstemp: try again.
            if attempt == 2:
                raise
    try:
        with os.fdopen(fd, "wb") as handle:
            # mkstemp makes 0600 files; other pods or users sharing the folder must read them.
            os.fchmod(handle.fileno(), 0o644)
            fill(handle)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

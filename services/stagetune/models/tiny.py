"""Tiny random-weight models of every family (`stagetune tiny-model FAMILY`), and what their builders share.

Each family's builder writes a whole diffusers pipeline folder. The folder is assembled beside the target and
renamed into place, so a crashed build never leaves a half-written model that loads.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from stagetune.core.errors import InputError, NotSupportedError

#: family → "module:function(output_dir, *, seed, size) -> Path".
BUILDERS = {
    "sana": "stagetune.models.sana.tiny:build_tiny_sana",
    "sd3": "stagetune.models.sd3.tiny:build_tiny_sd3",
}
#: The sizes every builder knows (each family's dims tables have these keys).
SIZE_NAMES = ("tiny", "compute")
D = TypeVar("D")


def build_tiny(family: str, output_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    if family not in BUILDERS:
        raise NotSupportedError(f"no tiny model for model family {family!r} (there are: {', '.join(BUILDERS)})",
                                field="family")
    module, _, name = BUILDERS[family].partition(":")
    return getattr(importlib.import_module(module), name)(Path(output_dir), seed=seed, size=size)


def pick_size(sizes: Mapping[str, D], size: str) -> D:
    """The widths of one size; an unknown size is an `InputError` naming the choices."""
    try:
        return sizes[size]
    except KeyError:
        raise InputError(f"unknown tiny model size {size!r}; choose one of: {', '.join(sizes)}",
                         field="size") from None


def write_model_folder(output_dir: Path, build: Callable[[Path], None]) -> Path:
    """`build(folder)` into a staging folder beside `output_dir`, then renamed to it; `output_dir` must not
    exist or be an empty folder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise InputError(f"{output_dir} already exists and is not an empty folder", field="output")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        build(staging / "model")
        if output_dir.exists():
            output_dir.rmdir()
        (staging / "model").rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir

"""List a local dataset folder: every image file, recursively, in a stable order.

Sorted relative paths make the listing (and so the manifest id) independent of the file system's
directory order; size and mtime come from the same `stat`, for progress and cheap change checks.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from stagetune.core.errors import InputError

# Pillow's readable formats (SimpleTuner's `image_file_extensions` is built the same way), minus
# ones a dataset folder never means as training images.
_EXCLUDED = {"pdf", "eps", "ps", "fits", "grib", "bufr", "h5", "hdf", "mpeg", "mpg"}


def _image_extensions() -> frozenset[str]:
    Image.init()
    readable = {
        ext.lower().lstrip(".") for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
    }
    return frozenset(readable - _EXCLUDED)


IMAGE_EXTENSIONS = _image_extensions()


@dataclass(frozen=True)
class DiscoveredFile:
    path: Path  # absolute
    relative_path: str  # POSIX, relative to the dataset root
    size: int
    mtime_ns: int


def is_image_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


def discover_images(root: Path) -> list[DiscoveredFile]:
    """Image files under `root` (following symlinked files, skipping hidden folders), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"instance_data_dir is not a folder: {root}", field="instance_data_dir")
    found: list[DiscoveredFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith(".") or not is_image_name(filename):
                continue
            full = Path(dirpath) / filename
            try:
                stat = full.stat()
            except OSError:
                stat = None
            relative = full.relative_to(root).as_posix()
            found.append(
                DiscoveredFile(
                    path=full.absolute(),
                    relative_path=relative,
                    size=stat.st_size if stat else -1,
                    mtime_ns=stat.st_mtime_ns if stat else 0,
                )
            )
    found.sort(key=lambda f: f.relative_path)
    return found


def limit_samples(files: list[DiscoveredFile], max_num_samples: int | None, dataset_id: str) -> list[DiscoveredFile]:
    """`max_num_samples`: SimpleTuner's `_apply_max_num_samples_limit`, so both pick the same subset.

    Absolute paths sorted as strings, shuffled by `random.Random(dataset_id)`, the first N kept (before any
    filtering, as SimpleTuner). Returned in listing order.
    """
    if not max_num_samples or len(files) <= max_num_samples:
        return files
    by_path = {str(f.path): f for f in files}
    shuffled = sorted(by_path)
    random.Random(dataset_id).shuffle(shuffled)
    chosen = set(shuffled[:max_num_samples])
    return [f for f in files if str(f.path) in chosen]


__all__ = ["IMAGE_EXTENSIONS", "DiscoveredFile", "discover_images", "is_image_name", "limit_samples"]

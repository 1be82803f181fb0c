"""Turning manifest rows into latents: shared by the VAE service and the trainer's on-demand cache."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from stagetune.core.encode import chunks
from stagetune.core.errors import InputError
from stagetune.ingest.manifest import ManifestRow


def pixel_seed(row: ManifestRow) -> int:
    """Each latent's posterior sample is seeded by its pixels' key: it does not depend on the batch."""
    return int(row.pixel_key[:15], 16)


def read_local_image(row: ManifestRow) -> Image.Image:
    from stagetune.core.imaging import load_image_rgb

    return load_image_rgb(row.path)


class DatasetImages:
    """Reads a row's image wherever its dataset lives: a local path, or an S3 dataset (`type: aws`)
    reached with the `aws_*` keys of the user's multidatabackend.json."""

    def __init__(self, data_backend_config_json: str = "") -> None:
        entries = json.loads(data_backend_config_json) if data_backend_config_json else []
        self._entries = {str(e.get("id")): e for e in entries if isinstance(e, dict)}
        self._sources: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _source(self, dataset_id: str) -> Any:
        from stagetune.ingest.sources import source_for

        with self._lock:
            if dataset_id not in self._sources:
                if dataset_id not in self._entries:
                    raise InputError(f"dataset {dataset_id!r} of the manifest is not in the data backend config",
                                     field="data_backend_config")
                self._sources[dataset_id] = source_for(self._entries[dataset_id])
            return self._sources[dataset_id]

    def __call__(self, row: ManifestRow) -> Image.Image:
        from stagetune.core.imaging import load_image_rgb

        if "://" not in row.path:
            return load_image_rgb(row.path)
        return load_image_rgb(self._source(row.dataset_id).read(row.path), name=row.path)


def batches_by_size(rows: Sequence[ManifestRow], batch_size: int) -> Iterable[list[ManifestRow]]:
    """A batch needs one pixel size: group by target size, then chunk."""
    by_size: dict[tuple[int, int], list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_size[tuple(row.target_size)].append(row)
    for size in sorted(by_size):
        yield from chunks(by_size[size], batch_size)


def encode_rows(encoder: Any, rows: Sequence[ManifestRow],
                read_image: Callable[[ManifestRow], Image.Image] = read_local_image,
                pool: ThreadPoolExecutor | None = None) -> list[dict[str, torch.Tensor]]:
    """Read and decode a batch's images (in parallel with `pool`: I/O and decoding), then encode them."""
    from stagetune.core.imaging import prepare_pixels

    def pixels_of(row: ManifestRow) -> torch.Tensor:
        return prepare_pixels(read_image(row), row)

    pixels = torch.stack(list(pool.map(pixels_of, rows)) if pool is not None else [pixels_of(r) for r in rows])
    latents = encoder.encode(pixels, [pixel_seed(row) for row in rows])
    return [{"latents": latent.contiguous()} for latent in latents]

"""Turning manifest rows into latents: shared by the VAE service and the trainer's on-demand cache."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from stagetune.core.encode import chunks
from stagetune.core.errors import InputError
from stagetune.core.manifest import ManifestRow


def pixel_seed(row: ManifestRow) -> int:
    """Each latent's posterior sample is seeded by its pixels' key: it does not depend on the batch."""
    return int(row.pixel_key[:15], 16)


def read_local_pixels(row: ManifestRow) -> torch.Tensor:
    from stagetune.core.imaging import load_sample_pixels

    return load_sample_pixels(row.path, row)


class DatasetImages:
    """Reads a row's image wherever its dataset lives: a local path, or an S3 dataset (`type: aws`)
    reached with the `aws_*` keys of the user's multidatabackend.json."""

    def __init__(self, data_backend_config_json: str = "") -> None:
        entries = json.loads(data_backend_config_json) if data_backend_config_json else []
        self._entries = {str(e.get("id")): e for e in entries if isinstance(e, dict)}
        self._sources: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _source(self, dataset_id: str) -> Any:
        from stagetune.core.sources import source_for

        with self._lock:
            if dataset_id not in self._sources:
                if dataset_id not in self._entries:
                    raise InputError(f"dataset {dataset_id!r} of the manifest is not in the data backend config",
                                     field="data_backend_config")
                self._sources[dataset_id] = source_for(self._entries[dataset_id])
            return self._sources[dataset_id]

    def read(self, row: ManifestRow) -> str | bytes:
        """A local path as it is (Pillow reads only what it decodes), an S3 object's bytes."""
        return self._read(row.dataset_id, row.path)

    def _read(self, dataset_id: str, path: str) -> str | bytes:
        if "://" not in path:
            return path
        return self._source(dataset_id).read(path)

    def __call__(self, row: ManifestRow) -> torch.Tensor:
        """The row's training pixels, [3, H, W] in [-1, 1]."""
        from stagetune.core.imaging import load_sample_pixels

        return load_sample_pixels(self.read(row), row, name=row.path)

    def mask(self, row: ManifestRow) -> torch.Tensor | None:
        """The row's loss mask at its training pixels (masked loss), or None."""
        if not row.mask:
            return None
        return mask_pixels(self._read(row.mask["dataset_id"], row.mask["path"]), row)


def mask_pixels(source: str | bytes, row: ManifestRow) -> torch.Tensor:
    """A mask image through its image's geometry (same resize and crop, so it covers the same pixels): its
    red channel, [1, H, W] in [-1, 1], as SimpleTuner reads a mask from its conditioning pixels."""
    from stagetune.core.imaging import load_sample_pixels

    assert row.mask is not None
    return load_sample_pixels(source, row, name=row.mask["path"])[:1]


def read_local_mask(row: ManifestRow) -> torch.Tensor | None:
    return mask_pixels(row.mask["path"], row) if row.mask else None


def latent_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """SimpleTuner's loss mask on the latent grid: area-averaged to `size`, then mapped from [-1, 1] to
    [0, 1] (white trains, black is ignored), [1, h, w] float32."""
    small = torch.nn.functional.interpolate(mask[None].float(), size=tuple(size), mode="area")[0]
    return (small / 2 + 0.5).contiguous()


def batches_by_size(rows: Sequence[ManifestRow], batch_size: int) -> Iterable[list[ManifestRow]]:
    """A batch needs one pixel size: group by target size, then chunk."""
    by_size: dict[tuple[int, int], list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_size[tuple(row.target_size)].append(row)
    for size in sorted(by_size):
        yield from chunks(by_size[size], batch_size)


def batch_pixels(rows: Sequence[ManifestRow],
                 read_pixels: Callable[[ManifestRow], torch.Tensor] = read_local_pixels,
                 pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """A batch's images read, decoded and shaped into [B, 3, H, W] (in parallel with `pool`).

    Stacked with numpy: this runs on helper threads, which must not start OpenMP workers (core/encode.py).
    """
    images = list(pool.map(read_pixels, rows)) if pool is not None else [read_pixels(r) for r in rows]
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


def batch_masks(rows: Sequence[ManifestRow], read_mask: Callable[[ManifestRow], torch.Tensor | None],
                pool: ThreadPoolExecutor | None = None) -> list[torch.Tensor | None] | None:
    """The batch's loss masks at pixel size (None for a row without one), or None when no row has one."""
    if not any(row.mask for row in rows):
        return None
    return list(pool.map(read_mask, rows)) if pool is not None else [read_mask(r) for r in rows]


def encode_rows(encoder: Any, rows: Sequence[ManifestRow],
                read_pixels: Callable[[ManifestRow], torch.Tensor] = read_local_pixels,
                pool: ThreadPoolExecutor | None = None, pixels: torch.Tensor | None = None,
                masks: list[torch.Tensor | None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Encode a batch; `pixels` (and `masks`) when they were prepared ahead (`batch_pixels`, `batch_masks`),
    else read here. A masked row's entry holds its loss mask on the latent grid beside the latent."""
    if pixels is None:
        pixels = batch_pixels(rows, read_pixels, pool)
        masks = batch_masks(rows, getattr(read_pixels, "mask", read_local_mask), pool)
    latents = encoder.encode(pixels, [pixel_seed(row) for row in rows])
    entries = [{"latents": latent.contiguous()} for latent in latents]
    for entry, mask in zip(entries, masks or [None] * len(entries), strict=True):
        if mask is not None:
            entry["loss_mask"] = latent_mask(mask, entry["latents"].shape[-2:])
    return entries

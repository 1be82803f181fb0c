"""Turning manifest rows into latents: shared by the VAE service and the trainer's on-demand cache."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from PIL import Image

from stagetune.core.encode import chunks
from stagetune.ingest.manifest import ManifestRow


def pixel_seed(row: ManifestRow) -> int:
    """Each latent's posterior sample is seeded by its pixels' key: it does not depend on the batch."""
    return int(row.pixel_key[:15], 16)


def read_local_image(row: ManifestRow) -> Image.Image:
    from stagetune.core.imaging import load_image_rgb

    return load_image_rgb(row.path)


def batches_by_size(rows: Sequence[ManifestRow], batch_size: int) -> Iterable[list[ManifestRow]]:
    """A batch needs one pixel size: group by target size, then chunk."""
    by_size: dict[tuple[int, int], list[ManifestRow]] = defaultdict(list)
    for row in rows:
        by_size[tuple(row.target_size)].append(row)
    for size in sorted(by_size):
        yield from chunks(by_size[size], batch_size)


def encode_rows(encoder: Any, rows: Sequence[ManifestRow],
                read_image: Callable[[ManifestRow], Image.Image] = read_local_image) -> list[dict[str, torch.Tensor]]:
    from stagetune.core.imaging import prepare_pixels

    pixels = torch.stack([prepare_pixels(read_image(row), row) for row in rows])
    latents = encoder.encode(pixels, [pixel_seed(row) for row in rows])
    return [{"latents": latent.contiguous()} for latent in latents]

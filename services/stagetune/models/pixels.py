"""What every latent encoder checks of the pixels it is given, with the same messages for every family."""

from __future__ import annotations

from typing import Any

from stagetune.core.errors import InputError


def check_pixels(pixels: Any, downsample: int, seeds: list[int] | None = None, *,
                 what: str = "the VAE") -> None:
    """[B, 3, H, W] with H and W multiples of the encoder's downsampling, and one seed per image."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InputError(f"pixels must be [B, 3, H, W], got {list(pixels.shape)}", field="pixels")
    height, width = pixels.shape[-2:]
    if height % downsample or width % downsample:
        raise InputError(f"image size {width}×{height} is not a multiple of {what}'s {downsample}", field="pixels")
    if seeds is not None and len(seeds) != pixels.shape[0]:
        raise InputError(f"{pixels.shape[0]} images but {len(seeds)} seeds", field="seeds")

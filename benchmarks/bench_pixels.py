"""How far the VAE stage's fast pixel path is from a full decode, and how much faster it is.

`load_sample_pixels` decodes a JPEG at a reduced DCT scale when the row's first resize is at least
`REDUCING_GAP` times smaller, and lets Pillow `reduce` by whole factors before LANCZOS. This script
compares it with a plain full-size decode and one LANCZOS resize (what SimpleTuner does) on the
photographs scikit-image ships, saved as JPEG (quality 92) at several sizes, and prints a Markdown table:
PSNR in dB (8-bit units) and milliseconds per image for both paths.

    pip install -e ".[examples]"   # scikit-image
    python benchmarks/bench_pixels.py
"""

from __future__ import annotations

import io
import time

import numpy as np
import skimage.data
import torch
from PIL import Image

from stagetune.core.imaging import load_sample_pixels

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SOURCE_WIDTHS = (320, 1024, 1536)
TARGET_WIDTHS = (64, 256)


def _jpeg(name: str, width: int) -> tuple[bytes, tuple[int, int]]:
    array = getattr(skimage.data, name)()
    height = round(width * array.shape[0] / array.shape[1])
    image = Image.fromarray(array).convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue(), (width, height)


def _row(size: tuple[int, int], target_width: int) -> dict:
    width, height = size
    target = (target_width, max(8, round(target_width * height / width) // 8 * 8))
    return {"path": "photo.jpg", "original_size": [width, height], "downsample_size": None,
            "intermediary_size": list(target), "crop_box": [0, 0, *target], "target_size": list(target)}


def _reference(data: bytes, row: dict) -> torch.Tensor:
    """Full decode, one LANCZOS resize to the target, no reduction step."""
    image = Image.open(io.BytesIO(data)).convert("RGB").resize(tuple(row["target_size"]), Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def _timed(fn, repeats: int = 5) -> tuple[torch.Tensor, float]:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - started) / repeats * 1000


def main() -> None:
    print("| photo | source px | target px | PSNR (dB) | full decode (ms) | fast path (ms) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in PHOTOS:
        for width in SOURCE_WIDTHS:
            data, size = _jpeg(name, width)
            for target_width in TARGET_WIDTHS:
                if target_width * 2 > width:
                    continue
                row = _row(size, target_width)
                full, full_ms = _timed(lambda data=data, row=row: _reference(data, row))
                fast, fast_ms = _timed(lambda data=data, row=row: load_sample_pixels(data, row, name="photo.jpg"))
                mse = float(((fast - full) * 127.5).pow(2).mean())
                psnr = 10 * np.log10(255**2 / mse) if mse > 0 else float("inf")
                print(f"| {name} | {size[0]}×{size[1]} | {row['target_size'][0]}×{row['target_size'][1]} | "
                      f"{psnr:.1f} | {full_ms:.1f} | {fast_ms:.1f} | {full_ms / fast_ms:.1f}× |")


if __name__ == "__main__":
    main()

"""Validation previews: sampling-time latents made into a small image, the same way for every family."""

from __future__ import annotations

from typing import Any


def preview_from_latents(decoder: Any, z: Any, *, upsample: int, max_edge: int) -> Any:
    """Unscaled latents `z` → a PIL image at most `max_edge` pixels wide. Larger latents are averaged down
    first: a preview shows where sampling is going, and decoding 1024 px every step would cost more than the
    sampling."""
    import torch
    from PIL import Image

    with torch.no_grad():
        factor = -(-max(z.shape[-2:]) * upsample // max_edge)  # ceil
        if factor > 1:
            z = torch.nn.functional.avg_pool2d(z, factor, ceil_mode=True)
        pixels = decoder.decode(z.to(decoder.dtype)).sample[0].float().clamp(-1, 1)
    array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)

"""Crop boxes as SimpleTuner's cropping.py draws them: shared by ingest (the manifest's crops) and the
trainer (`vae_cache_clear_each_epoch`'s new random crop each epoch), so both cut the same way."""

from __future__ import annotations

import random
from collections.abc import Sequence

import xxhash

Size = Sequence[int]


def seeded_rng(purpose: str, content_hash: str, seed: int) -> random.Random:
    """A generator that depends only on the image's content, the seed and what it is for."""
    return random.Random(xxhash.xxh3_64_intdigest(f"{purpose}{seed}:{content_hash}".encode()))


def crop_box(
    source_size: Size, target_size: Size, style: str, *, content_hash: str = "", seed: int = 0
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in `source_size` coordinates, as SimpleTuner's cropping.py."""
    src_w, src_h = source_size
    tgt_w, tgt_h = target_size
    if style == "corner":  # CornerCropping: the top-left corner
        return 0, 0, min(tgt_w, src_w), min(tgt_h, src_h)
    if style == "random":
        max_left = max(0, src_w - tgt_w)
        max_top = max(0, src_h - tgt_h)
        rng = seeded_rng("", content_hash, seed)
        left = rng.randint(0, max_left) if max_left > 0 else 0
        top = rng.randint(0, max_top) if max_top > 0 else 0
    else:  # center / centre
        left = max(0, int((src_w - tgt_w) / 2))
        top = max(0, int((src_h - tgt_h) / 2))
    right = left + min(tgt_w, src_w - left)
    bottom = top + min(tgt_h, src_h - top)
    return left, top, right, bottom

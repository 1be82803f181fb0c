"""`vae_cache_clear_each_epoch`: every epoch after the first trains on new latents of the same images.

SimpleTuner deletes the dataset's VAE cache at the end of each epoch and encodes again, so a
`crop_style: random` dataset gets a new crop each epoch and every dataset a new sample of the VAE's
posterior. Here nothing is deleted: epoch *e*'s row is a pure function of the manifest row, the run's
seed and *e* (a new random crop box inside the same intermediary image, same bucket and target size),
and its pixel key names "the e-th posterior sample of these pixels". The latent is encoded when the
trainer first needs it and written to the content-addressed cache, so a resumed or repeated run
reuses it and the weights stay bit-identical across a kill and resume.
"""

from __future__ import annotations

import dataclasses

from stagetune.core.crops import crop_box
from stagetune.core.manifest import ManifestRow, canonical_json, hash_bytes, pixel_key_for


def epoch_seed(seed: int, epoch: int) -> int:
    return int(hash_bytes(canonical_json(["epoch-crop", int(seed), int(epoch)]))[:15], 16)


def epoch_row(row: ManifestRow, *, crop_style: str | None, seed: int, epoch: int) -> ManifestRow:
    """The row as epoch `epoch` sees it; epoch 0 is the manifest's own row (its latent was cached ahead)."""
    if epoch <= 0:
        return row
    box = list(row.crop_box)
    if crop_style == "random":
        box = list(crop_box(tuple(row.intermediary_size), tuple(row.target_size), "random",
                            content_hash=row.content_hash, seed=epoch_seed(seed, epoch)))
    pixels = pixel_key_for(row.content_hash, row.downsample_size, row.intermediary_size, box, row.target_size)
    return dataclasses.replace(row, crop_box=box, pixel_key=hash_bytes(canonical_json([pixels, "posterior", epoch])))


__all__ = ["epoch_row", "epoch_seed"]

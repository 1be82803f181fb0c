"""vae_cache_clear_each_epoch: later epochs train on new crops and new posterior samples, reproducibly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_end_to_end import make_dataset, train_embedded, write_configs

from stagetune.core.cache import ShardedCache
from stagetune.core.manifest import ManifestRow, pixel_key_for
from stagetune.core.store import open_store
from stagetune.trainer.epochs import epoch_row


def _row(**changes: object) -> ManifestRow:
    base = dict(sample_id="s", dataset_id="d", path="/x.png", content_hash="c0ffee", captions=["a cat"],
                original_size=[160, 90], downsample_size=None, intermediary_size=[113, 64],
                crop_box=[24, 0, 88, 64], target_size=[64, 64], bucket="1.0", repeats=0,
                is_regularisation_data=False, pixel_key="")
    base.update(changes)
    row = ManifestRow(**base)  # type: ignore[arg-type]
    key = pixel_key_for(row.content_hash, row.downsample_size, row.intermediary_size, row.crop_box, row.target_size)
    return dataclasses.replace(row, pixel_key=key)


def test_epoch_rows_are_new_random_crops_of_the_same_size_and_reproducible() -> None:
    row = _row()
    assert epoch_row(row, crop_style="random", seed=7, epoch=0) is row
    later = [epoch_row(row, crop_style="random", seed=7, epoch=e) for e in range(1, 9)]
    for seen in later:
        left, top, right, bottom = seen.crop_box
        assert (right - left, bottom - top) == (64, 64) and 0 <= left <= 113 - 64 and top == 0
        assert (seen.target_size, seen.intermediary_size, seen.bucket) == (row.target_size, row.intermediary_size,
                                                                          row.bucket)
    assert len({tuple(s.crop_box) for s in later}) > 1  # crops move from epoch to epoch
    assert len({s.pixel_key for s in [row, *later]}) == 9  # every epoch its own latent
    assert later == [epoch_row(row, crop_style="random", seed=7, epoch=e) for e in range(1, 9)]
    assert later != [epoch_row(row, crop_style="random", seed=8, epoch=e) for e in range(1, 9)]


def test_fixed_crops_keep_their_box_but_get_a_new_posterior_sample() -> None:
    row = _row()
    seen = epoch_row(row, crop_style="center", seed=7, epoch=3)
    assert seen.crop_box == row.crop_box and seen.pixel_key != row.pixel_key


def test_each_epoch_trains_on_new_latents_and_runs_repeat_bit_for_bit(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=8, validation=False)  # 8 images, batch 2: 2 epochs
    backends_path = tmp_path / "multidatabackend.json"
    backends = json.loads(backends_path.read_text())
    backends[0].update(crop_style="random", vae_cache_clear_each_epoch=True)
    backends_path.write_text(json.dumps(backends))
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("vae").outputs["encoded"] == "8"  # epoch 0, encoded ahead as usual
    latents = ShardedCache(open_store(str(tmp_path / "store")), run.phase("vae").outputs["cache_prefix"])
    latents.refresh()
    assert len(latents) == 16  # epoch 1 encoded its own 8 during training, and kept them

    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    again = write_configs(other, tiny_sd3_path, steps=8, validation=False, data_backend_config=str(backends_path))
    train_embedded(again, str(other / "store"))
    first = load_file(tmp_path / "output" / "pytorch_lora_weights.safetensors")
    second = load_file(other / "output" / "pytorch_lora_weights.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

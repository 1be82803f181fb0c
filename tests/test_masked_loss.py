"""Masked loss (SimpleTuner's `conditioning_type: mask` datasets): each image's mask is found by its path,
cropped as its image is, cached beside the latent on the latent grid, and weights the loss there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from test_end_to_end import make_dataset, train_embedded, write_configs

from stagetune.core.cache import ShardedCache
from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.errors import ConfigError, NotSupportedError
from stagetune.core.manifest import load_manifest, load_report
from stagetune.core.store import open_store
from stagetune.trainer.flow import masked_mse

LORA = "pytorch_lora_weights.safetensors"


def _masks(data: Path, folder: Path, fill: str) -> None:
    """One mask per image under the same name: white left half and black right half, or all one colour."""
    folder.mkdir(parents=True)
    for image in sorted(data.glob("*.png")):
        width, height = Image.open(image).size
        pixels = np.zeros((height, width), dtype=np.uint8)
        if fill == "half":
            pixels[:, : width // 2] = 255
        elif fill == "white":
            pixels[:] = 255
        Image.fromarray(pixels, mode="L").save(folder / image.name)


def _masked_configs(root: Path, model: Path, steps: int, masks: Path, **extra: object) -> Path:
    config = write_configs(root, model, steps=steps, validation=False, **extra)
    backends = json.loads((root / "multidatabackend.json").read_text())
    backends[0]["conditioning_data"] = "shapes-masks"
    backends.insert(1, {"id": "shapes-masks", "type": "local", "dataset_type": "conditioning",
                        "conditioning_type": "mask", "instance_data_dir": str(masks), "resolution": 64,
                        "resolution_type": "pixel_area", "crop": True, "crop_aspect": "square",
                        "crop_style": "center"})
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


def test_masks_are_cached_on_the_latent_grid_with_their_images_crop(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    _masks(tmp_path / "data", tmp_path / "masks", "half")
    store_url = str(tmp_path / "store")
    run = train_embedded(_masked_configs(tmp_path, tiny_sd3_path, 1, tmp_path / "masks"), store_url)
    store = open_store(store_url)
    rows = load_manifest(store, run.phase("ingest").outputs["manifest_id"])
    assert len(rows) == 8 and all(row.mask and row.mask["path"].startswith(str(tmp_path / "masks")) for row in rows)
    assert rows[0].mask["path"].endswith(Path(rows[0].path).name)
    latent_keys = json.loads(store.get_bytes(run.phase("vae").outputs["keys"]))
    cache = ShardedCache(store, run.phase("vae").outputs["cache_prefix"])
    cache.refresh()
    for row in rows:
        entry = cache.get(latent_keys[row.sample_id])
        mask, latents = entry["loss_mask"], entry["latents"]
        assert mask.shape == (1, *latents.shape[-2:])
        # the image's centre crop keeps the middle of a white-left / black-right mask
        width = mask.shape[-1]
        assert float(mask[..., : width // 2 - 1].min()) == 1.0 and float(mask[..., width // 2 + 1:].max()) == 0.0


def test_a_black_mask_trains_nothing_and_a_white_one_equals_no_mask(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    _masks(tmp_path / "data", tmp_path / "black", "black")
    _masks(tmp_path / "data", tmp_path / "white", "white")
    store = str(tmp_path / "store")
    black = _masked_configs(tmp_path, tiny_sd3_path, 2, tmp_path / "black", output_dir=str(tmp_path / "out-black"))
    train_embedded(black, store)
    lora = load_safetensors((tmp_path / "out-black" / LORA).read_bytes())
    b_weights = [v for k, v in lora.items() if "lora_B" in k]
    assert b_weights and all(torch.count_nonzero(v) == 0 for v in b_weights)  # zero loss: B never leaves 0
    white = _masked_configs(tmp_path, tiny_sd3_path, 2, tmp_path / "white", output_dir=str(tmp_path / "out-white"))
    train_embedded(white, store)
    plain = write_configs(tmp_path, tiny_sd3_path, steps=2, validation=False, output_dir=str(tmp_path / "out-plain"))
    train_embedded(plain, store)
    a = load_safetensors((tmp_path / "out-white" / LORA).read_bytes())
    b = load_safetensors((tmp_path / "out-plain" / LORA).read_bytes())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


def test_an_image_without_a_usable_mask_is_reported_and_skipped(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    _masks(tmp_path / "data", tmp_path / "masks", "half")
    (tmp_path / "masks" / "image_3.png").unlink()
    Image.new("L", (10, 10), 255).save(tmp_path / "masks" / "image_5.png")
    run = train_embedded(_masked_configs(tmp_path, tiny_sd3_path, 1, tmp_path / "masks"), str(tmp_path / "store"))
    report = load_report(open_store(str(tmp_path / "store")), run.phase("ingest").outputs["manifest_id"])
    reasons = {Path(f["path"]).name: f["reason"] for f in report["filtered"]}
    assert "no mask image_3.png in mask dataset 'shapes-masks'" in reasons["image_3.png"]
    assert "is 10x10 but its image is 90x90" in reasons["image_5.png"]


def test_mask_pairs_are_checked_with_the_config(tmp_path: Path) -> None:
    image = {"id": "photos", "instance_data_dir": str(tmp_path), "conditioning_data": "photo-masks"}
    text = {"id": "text", "dataset_type": "text_embeds", "default": True}
    mask = {"id": "photo-masks", "dataset_type": "conditioning", "conditioning_type": "mask",
            "instance_data_dir": str(tmp_path)}
    backends = load_data_backend_config([image, mask, text])
    assert [d.id for d in backends.enabled] == ["photos"]
    assert backends.mask_for(backends.get("photos")).id == "photo-masks"
    assert [d.id for d in backends.read] == ["photos", "photo-masks"]
    with pytest.raises(ConfigError, match="conditioning_data 'photo-mask' is not a dataset id") as info:
        load_data_backend_config([{**image, "conditioning_data": "photo-mask"}, mask, text])
    assert "is not named by any image dataset" in str(info.value)  # both problems at once
    with pytest.raises(NotSupportedError, match="conditioning_type=controlnet"):
        load_data_backend_config([image, {**mask, "conditioning_type": "controlnet"}, text])


def test_masked_mse_is_simpletuners_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 6, 6, generator=generator), torch.randn(2, 4, 6, 6, generator=generator)
    mask = torch.rand(2, 1, 6, 6, generator=generator)
    per_element = torch.nn.functional.mse_loss(pred, target, reduction="none") * mask
    expected = per_element.mean(dim=[1, 2, 3]).mean()  # SimpleTuner: mean per sample, then over the batch
    assert torch.allclose(masked_mse(pred, target, mask), expected, rtol=1e-6)
    assert torch.equal(masked_mse(pred, target), torch.nn.functional.mse_loss(pred, target))

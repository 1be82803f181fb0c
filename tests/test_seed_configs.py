"""The SD3 quickstarts' configs (every snippet of a seed merged, as a user pastes them together), with only
the model, data and output paths changed, train on the tiny model, and the result loads in plain diffusers.

The seeds are the user's source documents (../shared/seeds); without them these tests skip, naming where
they looked (STAGETUNE_SEEDS points elsewhere).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_config_train import config_blocks, json_blocks, seed_texts
from test_end_to_end import make_dataset, train_embedded

SD3_SEEDS = ("000_2c8829940f8a1939.txt", "001_7def1245ac98fed0.txt", "004_ac35b248de7e8a28.txt")


def merged_seed_config(name: str) -> dict:
    merged: dict = {}
    for block in config_blocks(seed_texts()[name]):
        merged.update(block)  # later snippets add to (or override) earlier ones, as a user pastes them
    return merged


@pytest.mark.parametrize("seed", SD3_SEEDS)
def test_the_seed_config_loads_with_only_paths_changed(tmp_path: Path, seed: str) -> None:
    from stagetune.core.config.train import load_train_config

    config = merged_seed_config(seed)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user_prompt_library.json").write_text(json.dumps({"cat": "a photo of a cat"}))
    loaded = load_train_config({**config, "pretrained_model_name_or_path": "/models/tiny"}, base_dir=tmp_path)
    assert loaded.base_model_precision == "int8-quanto" and loaded.optimizer == "adamw_bf16"
    assert loaded.family_options["validation_guidance_skip_layers"] == [7, 8, 9]
    assert loaded.validation_guidance == 4.0  # the later snippet's --validation_guidance, as SimpleTuner
    assert any("both set validation_guidance" in w for w in loaded.warnings)


def test_seed_000_trains_on_the_tiny_model_and_loads_in_diffusers(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    config = merged_seed_config(SD3_SEEDS[0])
    # the only changes: model, data and output paths (and the prompt library the guide points at)
    config.update(pretrained_model_name_or_path=str(tiny_sd3_path), output_dir=str(tmp_path / "output"),
                  data_backend_config=str(tmp_path / "multidatabackend.json"))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user_prompt_library.json").write_text(json.dumps({"cat": "a photo of a cat"}))
    make_dataset(tmp_path / "data")
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "pseudo-camera-10k-sd3", "type": "local", "crop": True, "crop_aspect": "square",
         "crop_style": "center", "resolution": 64, "minimum_image_size": 0, "maximum_image_size": 64,
         "target_downsample_size": 64, "resolution_type": "pixel_area", "cache_dir_vae": "cache/vae/sd3",
         "instance_data_dir": str(tmp_path / "data"), "disabled": False, "skip_file_discovery": "",
         "caption_strategy": "textfile", "metadata_backend": "discovery"},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/sd3", "disabled": False, "write_batch_size": 128},
    ]))
    (tmp_path / "config.json").write_text(json.dumps(config))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the guide's relative paths (config/user_prompt_library.json) resolve here
    try:
        run = train_embedded(tmp_path / "config.json", str(tmp_path / "store"))
    finally:
        os.chdir(cwd)
    outputs = run.phase("trainer").outputs
    assert int(outputs["steps"]) >= 1
    lora = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    saved = load_file(lora)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    pipe.load_lora_weights(str(lora.parent))
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert set(loaded) == {k.removeprefix("transformer.") for k in saved}
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.removeprefix("transformer.")], tensor.to(torch.float32)), key
    images = sorted(p.name for p in (tmp_path / "output" / "validation_images").iterdir())
    assert any("1024x1024" in name for name in images) and any("1280x768" in name for name in images)


SANA_SEED = "003_ecfc6d00628a8bf1.txt"


def sana_guide_config(text: str) -> dict:
    """Seed 003's config as its option list and snippets describe it: each `- `key` - … `value`` bullet, the
    values its prose gives (batch "up to 6", "around 50" steps, interval 2), then its JSON snippets."""
    config: dict = {}
    for key, value in re.findall(r"^- `(\w+)` - .*?`([^`]+)`", text, re.M):
        config[key] = {"true": True, "false": False}.get(value, value)
    config.update(train_batch_size=6, validation_num_inference_steps=50, gradient_checkpointing=True,
                  gradient_checkpointing_interval=2)
    for block in config_blocks(text):
        config.update(block)
    return config


def test_seed_003_trains_sana_full_rank_on_the_tiny_model(tmp_path: Path, tiny_sana_path: Path) -> None:
    """Its config pair with only paths changed (and a step count): the regularisation set at 512 px, the
    subject at 1024 and 512 px with `repeats: 1000` and `instanceprompt`, EMA, bf16, previews."""
    from diffusers import SanaPipeline

    text = seed_texts()[SANA_SEED]
    config = sana_guide_config(text)
    assert config["model_family"] == "sana" and config["model_type"] == "full" and config["use_ema"] is True
    assert config["optimizer"] == "optimi-adamw" and config["mixed_precision"] == "bf16"
    assert config["validation_resolution"] == "1024x1024" and config["validation_preview"] is True
    config.update(pretrained_model_name_or_path=str(tiny_sana_path), output_dir=str(tmp_path / "output"),
                  data_backend_config=str(tmp_path / "multidatabackend.json"), max_train_steps=3,
                  validation_steps=3)
    (datasets,) = [block for block in json_blocks(text) if isinstance(block, list)]
    folders = {"pseudo-camera-10k": tmp_path / "camera", "dreambooth-subject": tmp_path / "subject"}
    for dataset in datasets:
        if "instance_data_dir" in dataset:
            dataset["instance_data_dir"] = str(folders[Path(dataset["instance_data_dir"]).name])
    _write_pictures(folders["pseudo-camera-10k"], 6, 512, captions=True)  # a full batch of 6 (repeats: 0)
    _write_pictures(folders["dreambooth-subject"], 2, 1024, captions=False)
    (tmp_path / "config").mkdir()
    library = [b for b in json_blocks(text) if isinstance(b, dict) and "anime_<token>" in b][0]
    (tmp_path / "config" / "user_prompt_library.json").write_text(json.dumps(dict(list(library.items())[:2])))
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    (tmp_path / "config.json").write_text(json.dumps(config))
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the guide's relative paths (config/…, cache/…) resolve here
    try:
        run = train_embedded(tmp_path / "config.json", str(tmp_path / "store"))
    finally:
        os.chdir(cwd)
    assert run.phase("trainer").outputs["steps"] == "3"
    pipe = SanaPipeline.from_pretrained(tmp_path / "output")
    trained = load_file(tmp_path / "output" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.transformer.state_dict()[k], trained[k]) for k in trained)
    SanaPipeline.from_pretrained(tmp_path / "output" / "ema")
    images = [p.name for p in (tmp_path / "output" / "validation_images").rglob("*.png")]
    assert any("1024x1024" in name for name in images), (images, run.phase("trainer").outputs, config)


def _write_pictures(folder: Path, count: int, edge: int, *, captions: bool) -> None:
    """Smooth random pictures `edge` pixels square (the guide's sets have minimum_image_size = resolution)."""
    from PIL import Image

    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(edge + count)
    for i in range(count):
        small = torch.rand(3, 8, 8, generator=generator)
        pixels = torch.nn.functional.interpolate(small[None], size=(edge, edge), mode="bilinear")[0]
        array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(folder / f"photo_{i}.jpg", quality=90)
        if captions:
            (folder / f"photo_{i}.jpg").with_suffix(".txt").write_text(f"a photo number {i}")

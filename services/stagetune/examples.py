"""A ready-to-train example: tiny random-weight model, real photos, SimpleTuner-shaped configs.

The photos are the sample images scikit-image ships inside its wheel (read as files, never
downloaded); the configs have the shape of the SD3 quickstart (seed 000) scaled to 64 px, so a
first run takes about a minute on a laptop CPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from stagetune.core.errors import InputError

#: scikit-image sample file → caption (written as a .txt beside the image: caption_strategy textfile).
PHOTOS = {
    "astronaut.png": "a portrait of an astronaut in a white spacesuit in front of a flag",
    "chelsea.png": "a tabby cat looking to the side",
    "coffee.png": "a cup of coffee on a saucer seen from above",
    "rocket.jpg": "a rocket on a launch pad under a blue sky",
    "hubble_deep_field.jpg": "a deep field of distant galaxies in space",
    "motorcycle_left.png": "a red motorcycle parked indoors",
    "retina.jpg": "a photo of the retina of a human eye",
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "moon.png": "a black and white photo of the surface of the moon",
    "coins.png": "a black and white photo of old coins",
    "brick.png": "a close-up texture of a brick wall",
    "grass.png": "a close-up texture of grass",
    "gravel.png": "a close-up texture of gravel",
    "ihc.png": "a microscope image of stained tissue",
    "page.png": "a scanned page of printed text",
    "color.png": "a chart of coloured bands",
}


def sample_photo_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the example needs scikit-image's sample photos: pip install scikit-image",
                         field="scikit-image")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def write_photos(folder: Path) -> int:
    source = sample_photo_dir()
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, caption in PHOTOS.items():
        if not (source / name).exists():
            continue
        shutil.copyfile(source / name, folder / name)
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
        count += 1
    if count == 0:
        raise InputError(f"no sample photos found in {source}", field="scikit-image")
    return count


#: What a family's example changes: Sana's is a full-rank fine-tune, as seed 003 (SimpleTuner's Sana quickstart).
FAMILY_SETTINGS: dict[str, dict] = {
    "sd3": {},
    "sana": {"model_type": "full", "learning_rate": 1e-4, "lora_rank": None, "lora_alpha": None, "use_ema": True,
             "ema_decay": 0.99, "ema_validation": "comparison"},
}


def example_configs(root: Path, *, steps: int, family: str = "sd3") -> tuple[dict, list]:
    config = {
        "model_type": "lora",
        "model_family": family,
        "pretrained_model_name_or_path": str(root / "model"),
        "output_dir": str(root / "output"),
        "data_backend_config": str(root / "multidatabackend.json"),
        "seed": 42,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "optimizer": "adamw",
        "max_grad_norm": 2.0,
        "grad_clip_method": "norm",
        "mixed_precision": "no",
        "lora_rank": 4,
        "lora_alpha": 4,
        "checkpointing_steps": max(1, steps // 2),
        "checkpoints_total_limit": 2,
        "resume_from_checkpoint": "latest",
        "validation_steps": max(1, steps // 2),
        "validation_prompt": "a tabby cat looking to the side",
        "validation_resolution": "64x64",
        "validation_guidance": 3.0,
        "validation_num_inference_steps": 4,
        "validation_seed": 42,
        "vae_batch_size": 4,
        "write_batch_size": 16,
    }
    datasets = [
        {
            "id": "skimage-photos",
            "type": "local",
            "crop": True,
            "crop_aspect": "square",
            "crop_style": "center",
            "resolution": 64,
            "minimum_image_size": 0,
            "maximum_image_size": 64,
            "target_downsample_size": 64,
            "resolution_type": "pixel_area",
            "cache_dir_vae": f"cache/vae/{family}/skimage-photos",
            "instance_data_dir": str(root / "datasets" / "photos"),
            "disabled": False,
            "skip_file_discovery": "",
            "caption_strategy": "textfile",
            "metadata_backend": "discovery",
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": f"cache/text/{family}/skimage-photos",
            "disabled": False,
            "write_batch_size": 128,
        },
    ]
    config.update(FAMILY_SETTINGS[family])
    return {key: value for key, value in config.items() if value is not None}, datasets


def write_example(family: str, output: Path, *, steps: int = 20) -> Path:
    if family not in FAMILY_SETTINGS:
        raise InputError(f"no example for model family {family!r} (there are: {', '.join(FAMILY_SETTINGS)})",
                         field="family")
    from stagetune.models.tiny import build_tiny

    root = output.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "model" / "model_index.json").exists():
        build_tiny(family, root / "model")
    write_photos(root / "datasets" / "photos")
    config, datasets = example_configs(root, steps=steps, family=family)
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2) + "\n")
    return root / "config.json"

"""multidatabackend.json loading: seed examples load unchanged, every other key is rejected precisely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stagetune.core.config.dataset import DatasetConfig, load_data_backend_config
from stagetune.core.errors import ConfigError, NotSupportedError

SEED_000 = [
    {
        "id": "pseudo-camera-10k-sd3",
        "type": "local",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution": 1024,
        "minimum_image_size": 0,
        "maximum_image_size": 1024,
        "target_downsample_size": 1024,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "/home/user/simpletuner/output/cache/vae/sd3/pseudo-camera-10k",
        "instance_data_dir": "/home/user/simpletuner/datasets/pseudo-camera-10k",
        "disabled": False,
        "skip_file_discovery": "",
        "caption_strategy": "filename",
        "metadata_backend": "discovery",
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/sd3/pseudo-camera-10k",
        "disabled": False,
        "write_batch_size": 128,
    },
]

SEED_003 = [
    {
        "id": "pseudo-camera-10k-sana",
        "type": "local",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
        "resolution": 512,
        "minimum_image_size": 512,
        "maximum_image_size": 512,
        "target_downsample_size": 512,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/sana/pseudo-camera-10k",
        "instance_data_dir": "datasets/pseudo-camera-10k",
        "disabled": False,
        "skip_file_discovery": "",
        "caption_strategy": "filename",
        "metadata_backend": "discovery",
        "repeats": 0,
        "is_regularisation_data": True,
    },
    {
        "id": "dreambooth-subject",
        "type": "local",
        "crop": False,
        "resolution": 1024,
        "minimum_image_size": 1024,
        "maximum_image_size": 1024,
        "target_downsample_size": 1024,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/sana/dreambooth-subject",
        "instance_data_dir": "datasets/dreambooth-subject",
        "caption_strategy": "instanceprompt",
        "instance_prompt": "the name of your subject goes here",
        "metadata_backend": "discovery",
        "repeats": 1000,
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/sana",
        "disabled": False,
        "write_batch_size": 128,
    },
]


def _with(entry: dict, **changes) -> list[dict]:
    return [{**SEED_000[0], **changes}, SEED_000[1]]


def test_seed_000_loads_from_file(tmp_path: Path) -> None:
    path = tmp_path / "multidatabackend.json"
    path.write_text(json.dumps(SEED_000))
    backends = load_data_backend_config(path)
    assert len(backends.datasets) == 1
    ds = backends.datasets[0]
    assert isinstance(ds, DatasetConfig)
    assert ds.id == "pseudo-camera-10k-sd3"
    assert ds.crop is True and ds.crop_aspect == "square" and ds.crop_style == "center"
    assert ds.resolution == 1024 and ds.resolution_type == "pixel_area"
    assert ds.instance_data_dir == Path("/home/user/simpletuner/datasets/pseudo-camera-10k")
    assert ds.cache_dir_vae.endswith("pseudo-camera-10k")
    assert ds.caption_strategy == "filename" and ds.metadata_backend == "discovery"
    # pixel_area: E²/1e6 megapixels; sizes > 10 are pixel edges converted the same way; 0 means off.
    assert ds.bucket_mode == "area"
    assert ds.bucket_resolution == pytest.approx(1.048576)
    assert ds.bucket_maximum_image_size == pytest.approx(1.048576)
    assert ds.bucket_target_downsample_size == pytest.approx(1.048576)
    assert ds.bucket_minimum_image_size is None
    text = backends.default_text_embeds
    assert text is not None and text.id == "text-embeds" and text.write_batch_size == 128
    assert text.cache_dir == "cache/text/sd3/pseudo-camera-10k"


def test_seed_003_relative_dirs_resolve_against_base_dir(tmp_path: Path) -> None:
    backends = load_data_backend_config(SEED_003, base_dir=tmp_path)
    sana, subject = backends.datasets
    assert sana.instance_data_dir == (tmp_path / "datasets/pseudo-camera-10k").resolve()
    assert sana.is_regularisation_data is True and sana.repeats == 0
    assert sana.bucket_minimum_image_size == pytest.approx(512 * 512 / 1e6)
    assert subject.repeats == 1000 and subject.crop is False
    assert subject.instance_prompts == ["the name of your subject goes here"]
    # crop_style / crop_aspect not set: SimpleTuner's defaults (random, square)
    assert subject.crop_style == "random" and subject.crop_aspect == "square"


def test_defaults_from_config_json_are_inherited_and_overridden() -> None:
    entry = {"id": "d", "instance_data_dir": "/data"}
    backends = load_data_backend_config(
        [entry, SEED_000[1]],
        defaults={"--resolution": 512, "--resolution_type": "pixel", "crop": True, "--caption_strategy": "textfile"},
    )
    ds = backends.datasets[0]
    assert (ds.resolution, ds.resolution_type, ds.crop, ds.caption_strategy) == (512, "pixel", True, "textfile")
    backends = load_data_backend_config([{**entry, "resolution": 768}, SEED_000[1]], defaults={"resolution": 512})
    assert backends.datasets[0].resolution == 768
    # SimpleTuner's own defaults when neither sets them
    ds = load_data_backend_config([entry, SEED_000[1]]).datasets[0]
    assert (ds.resolution, ds.resolution_type, ds.caption_strategy, ds.crop) == (1024, "pixel_area", "filename", False)


def test_centre_spelling_and_dashed_keys() -> None:
    ds = load_data_backend_config(_with(SEED_000[0], crop_style="centre")).datasets[0]
    assert ds.crop_style == "center"
    entry = {**SEED_000[0]}
    entry["--repeats"] = 3
    assert load_data_backend_config([entry, SEED_000[1]]).datasets[0].repeats == 3


def test_unknown_key_names_dataset_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        load_data_backend_config(_with(SEED_000[0], crop_styel="center"))
    message = str(info.value)
    assert "pseudo-camera-10k-sd3" in message and "crop_styel" in message and "crop_style" in message
    assert info.value.field == "crop_styel"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("caption_shuffle", {"enable": True}),
        ("vae_cache_disable", True),
        ("conditioning_config", {"type": "i2v"}),
        ("delete_unwanted_images", True),
        ("start_epoch", 2),
    ],
)
def test_recognised_keys_are_not_supported_yet(key: str, value: object) -> None:
    with pytest.raises(NotSupportedError) as info:
        load_data_backend_config(_with(SEED_000[0], **{key: value}))
    assert f"not supported yet: {key}" in str(info.value)
    assert "pseudo-camera-10k-sd3" in str(info.value)


def test_recognised_keys_at_inert_defaults_load() -> None:
    ds = load_data_backend_config(
        _with(SEED_000[0], vae_cache_ondemand=False, max_num_samples=None, caption_shuffle=None)
    ).datasets[0]
    assert ds.id == "pseudo-camera-10k-sd3"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"type": "huggingface"}, "type"),
        ({"crop_style": "face"}, "crop_style"),
        ({"caption_strategy": "huggingface"}, "caption_strategy"),
        ({"metadata_backend": "huggingface"}, "metadata_backend"),
        ({"dataset_type": "video"}, "dataset_type"),
    ],
)
def test_values_for_later_issues(changes: dict, key: str) -> None:
    with pytest.raises(NotSupportedError) as info:
        load_data_backend_config(_with(SEED_000[0], **changes))
    assert f"not supported yet: {key}" in str(info.value)
    assert info.value.field == key


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"resolution_type": "megapixel"}, "resolution_type"),
        ({"crop_style": "middle"}, "crop_style"),
        ({"caption_strategy": "instanceprompt"}, "instance_prompt"),
        ({"prepend_instance_prompt": True}, "instance_prompt"),
        ({"repeats": -1}, "repeats"),
        ({"repeats": 1.5}, "repeats"),
        ({"crop": "maybe"}, "crop"),
        ({"resolution": "big"}, "resolution"),
        ({"target_downsample_size": None}, "target_downsample_size"),
        ({"resolution_type": "area", "resolution": 1.0}, "maximum_image_size"),
    ],
)
def test_bad_values_name_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_data_backend_config(_with(SEED_000[0], **changes))
    assert info.value.field == key
    assert "pseudo-camera-10k-sd3" in str(info.value)


def test_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="text_embeds"):
        load_data_backend_config([SEED_000[0]])
    with pytest.raises(ConfigError, match="used twice"):
        load_data_backend_config([SEED_000[0], SEED_000[0], SEED_000[1]])
    with pytest.raises(ConfigError, match="no enabled image dataset"):
        load_data_backend_config(_with(SEED_000[0], disabled=True))
    two_defaults = [SEED_000[0], SEED_000[1], {**SEED_000[1], "id": "te2"}]
    with pytest.raises(ConfigError, match="only one"):
        load_data_backend_config(two_defaults)
    with pytest.raises(ConfigError, match="not found"):
        load_data_backend_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_data_backend_config(bad)
    with pytest.raises(NotSupportedError, match="not supported yet: type"):
        load_data_backend_config([SEED_000[0], {**SEED_000[1], "type": "aws"}])


def test_disabled_dataset_is_kept_but_not_enabled() -> None:
    entries = [SEED_000[0], {**SEED_000[0], "id": "off", "disabled": True}, SEED_000[1]]
    backends = load_data_backend_config(entries)
    assert [d.id for d in backends.datasets] == ["pseudo-camera-10k-sd3", "off"]
    assert [d.id for d in backends.enabled] == ["pseudo-camera-10k-sd3"]


def test_s3_dataset_needs_a_bucket_and_keeps_secrets_out_of_repr_and_hash() -> None:
    entry = {"id": "remote", "type": "aws", "aws_bucket_name": "photos", "aws_data_prefix": "set1",
             "aws_endpoint_url": "http://127.0.0.1:9000", "aws_access_key_id": "AKIA-VISIBLE-NOT",
             "aws_secret_access_key": "s3cr3t-value", "caption_strategy": "filename"}
    text = {"id": "t", "type": "local", "dataset_type": "text_embeds", "default": True}
    ds = load_data_backend_config([entry, text]).datasets[0]
    assert ds.type == "aws" and ds.aws_bucket_name == "photos" and ds.instance_data_dir is None
    assert "s3cr3t-value" not in repr(ds) and "s3cr3t-value" not in json.dumps(ds.ingest_options(), default=str)
    with pytest.raises(ConfigError, match="aws_bucket_name is required"):
        load_data_backend_config([{k: v for k, v in entry.items() if k != "aws_bucket_name"}, text])

"""A seed-000-shaped SD3 LoRA config trained end to end through the five services over gRPC.

Runs on both stores (local folder, the loopback S3 server), checks the LoRA file diffusers loads,
that a second run encodes nothing, and that a killed run resumes to the same weights bit for bit.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stagetune.core.store import open_store
from stagetune.pipeline import run_training, start_embedded

CAPTIONS = [
    "a red square on a blue background",
    "a green circle in the middle",
    "yellow stripes across the picture",
    "a dark night sky with one star",
    "an orange sunset over water",
    "a grey stone wall texture",
    "a purple flower in a field",
    "a white cloud in a blue sky",
]


def make_dataset(folder: Path) -> None:
    """Eight small pictures of mixed sizes with .txt captions (caption_strategy textfile)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(96, 96), (128, 96), (80, 120), (100, 100), (160, 90), (90, 90), (120, 120), (72, 108)]
    for i, (size, caption) in enumerate(zip(sizes, CAPTIONS, strict=True)):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        pixels[:, : size[0] // 2] = (40 * i) % 255  # some structure, not only noise
        Image.fromarray(pixels).save(folder / f"image_{i}.png")
        (folder / f"image_{i}.txt").write_text(caption)


def write_configs(root: Path, model: Path, *, steps: int, validation: bool = True, **extra: object) -> Path:
    config = {
        "model_type": "lora",
        "model_family": "sd3",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(root / "output"),
        "data_backend_config": str(root / "multidatabackend.json"),
        "seed": 7,
        "train_batch_size": 2,
        "max_train_steps": steps,
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "optimizer": "adamw",
        "mixed_precision": "no",
        "lora_rank": 4,
        "checkpointing_steps": 2,
        "checkpoints_total_limit": 3,
        "resume_from_checkpoint": "latest",
        "vae_batch_size": 3,
        "write_batch_size": 4,
        "tokenizer_max_length": 77,
        **extra,
    }
    if validation:
        config.update({
            "validation_steps": 2,
            "validation_prompt": "a red square on a blue background",
            "validation_resolution": "64x64",
            "validation_guidance": 3.0,
            "validation_num_inference_steps": 2,
            "validation_seed": 1,
        })
    datasets = [
        {   # the keys of seed 000's example, scaled to 64 px
            "id": "shapes", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
            "resolution": 64, "minimum_image_size": 0, "maximum_image_size": 64, "target_downsample_size": 64,
            "resolution_type": "pixel_area", "cache_dir_vae": "cache/vae/sd3/shapes",
            "instance_data_dir": str(root / "data"), "disabled": False, "skip_file_discovery": "",
            "caption_strategy": "textfile", "metadata_backend": "discovery",
        },
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": "cache/text/sd3/shapes", "disabled": False, "write_batch_size": 3},
    ]
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    return root / "config.json"


def use_s3_dataset(root: Path, s3_server: Any, local: Path, bucket: str | None = None) -> str:
    """`local`'s files uploaded under `sets/shapes` of `bucket` (default: a fresh one), and the first dataset of
    root's multidatabackend.json pointed at them (type aws, with the test server's endpoint and keys). Returns
    the bucket."""
    from fixtures_store import fresh_bucket

    bucket = bucket or fresh_bucket()
    client = s3_server.client()
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for path in sorted(local.iterdir()):
        data = path.read_bytes()
        client.put_object(bucket, f"sets/shapes/{path.name}", io.BytesIO(data), len(data))
    backends = json.loads((root / "multidatabackend.json").read_text())
    backends[0] = {
        "id": "shapes-s3", "type": "aws", "aws_bucket_name": bucket, "aws_data_prefix": "sets/shapes",
        "aws_endpoint_url": s3_server.endpoint, "aws_region_name": s3_server.region,
        "aws_access_key_id": s3_server.access_key, "aws_secret_access_key": s3_server.secret_key,
        "crop": True, "crop_aspect": "square", "resolution": 64, "resolution_type": "pixel_area",
        "caption_strategy": "textfile",
    }
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return bucket


def train_embedded(config: Path, store_url: str):
    store = open_store(store_url)
    servers = start_embedded(store)
    try:
        return run_training(config, {name: s.address for name, s in servers.items()})
    finally:
        for server in servers.values():
            server.stop(0)


def generate(pipe, seed: int = 3) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    image = pipe("a red square on a blue background", num_inference_steps=2, guidance_scale=1.0,
                 height=64, width=64, generator=generator, output_type="np").images[0]
    return image


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store_url")


def test_trains_end_to_end_and_second_run_encodes_nothing(tmp_path: Path, tiny_sd3_path: Path,
                                                          store_url: str) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=4)
    run = train_embedded(config, store_url)

    assert run.phase("ingest").outputs["samples"] == "8"
    assert run.phase("vae").outputs["encoded"] == "8"
    # every caption, the empty one (dropout), the validation prompt and SimpleTuner's default negative prompt
    expected_captions = set(CAPTIONS) | {"", "a red square on a blue background", "blurry, cropped, ugly"}
    assert run.phase("text").outputs["encoded"] == str(len(expected_captions))
    # Shards hold write_batch_size entries: the text_embeds entry's 3, config.json's 4 for latents.
    store = open_store(store_url)
    text_shards = list(store.list(run.phase("text").outputs["cache_prefix"] + "/shards/"))
    latent_shards = list(store.list(run.phase("vae").outputs["cache_prefix"] + "/shards/"))
    assert len(text_shards) == math.ceil(len(expected_captions) / 3)
    assert len(latent_shards) == 2
    output = tmp_path / "output"
    lora_file = output / "pytorch_lora_weights.safetensors"
    saved = load_file(lora_file)
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    images = sorted(p.name for p in (output / "validation_images").iterdir())
    assert images == ["step_2_validation_64x64.png", "step_4_validation_64x64.png"]
    assert Image.open(output / "validation_images" / images[0]).size == (64, 64)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    pipe.set_progress_bar_config(disable=True)
    before = generate(pipe)
    pipe.load_lora_weights(str(output))
    (adapter,) = pipe.transformer.peft_config  # exactly one adapter, on the transformer only
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    expected = {k.removeprefix("transformer."): v for k, v in saved.items()}
    assert set(loaded) == set(expected), "every saved tensor must be loaded, and nothing else"
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    after = generate(pipe)
    assert np.abs(after - before).max() > 1e-4, "the trained adapter must change the pipeline's output"

    # The same command again: the run is finished, nothing is trained, encoded or rewritten.
    weights = lora_file.read_bytes()
    again = train_embedded(config, store_url)
    assert again.already_finished == 4 and [p.name for p in again.phases] == ["ingest"]
    assert lora_file.read_bytes() == weights

    # A new run (another output_dir) on the same data and encoders: every latent and embedding is a cache hit.
    second = train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=4, output_dir=str(tmp_path / "second")),
                            store_url)
    for stage in ("vae", "text"):
        outputs = second.phase(stage).outputs
        assert outputs["encoded"] == "0" and outputs["hits"] == outputs["total"], (stage, outputs)
    assert second.phase("ingest").outputs["reused"] == "true"


def test_errors_name_the_key(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from stagetune.core.errors import ConfigError

    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, validation=False, lerning_rate=1e-4)
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        train_embedded(config, str(tmp_path / "store"))


def _cli(config: Path, store: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, STAGETUNE_STORE=str(store))
    return subprocess.Popen([sys.executable, "-m", "stagetune.cli", "train", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def cli_until_training(config: Path, store: Path) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`stagetune train` started, and a second into its training steps: (process, output so far, reader)."""
    proc = _cli(config, store)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(256), "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while "trainer: training" not in "".join(seen) and time.time() < deadline:
        assert proc.poll() is None, "".join(seen)
        time.sleep(0.05)
    time.sleep(1.0)
    return proc, seen, reader


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    steps = 40
    config = write_configs(tmp_path, tiny_sd3_path, steps=steps, validation=False)
    reference = tmp_path / "reference"
    reference.mkdir()
    train_embedded(write_configs(reference, tiny_sd3_path, steps=steps, validation=False,
                                 data_backend_config=str(tmp_path / "multidatabackend.json")),
                   str(tmp_path / "store"))
    output = tmp_path / "output"

    proc = _cli(config, tmp_path / "store")
    deadline = time.time() + 300
    while not list(output.glob("checkpoint-*/training_state.json")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: as a crash or an OOM kill
    proc.wait()
    assert not (output / "pytorch_lora_weights.safetensors").exists(), "the run must be killed mid-way"

    proc = _cli(config, tmp_path / "store")
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert "resuming from checkpoint-" in log
    resumed = load_file(output / "pytorch_lora_weights.safetensors")
    straight = load_file(reference / "output" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), f"{key} differs after kill and resume"


def test_ctrl_c_saves_a_checkpoint_and_the_next_run_resumes(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2000, validation=False, checkpointing_steps=100000)
    store = tmp_path / "store"
    proc, seen, reader = cli_until_training(config, store)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    log = "".join(seen)
    assert proc.returncode == 130, log
    assert "run the same command again to resume" in log
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "output").glob("checkpoint-*"))
    assert len(saved) == 1 and 0 < saved[0] < 2000, saved

    # A shorter run now: the same command resumes from the Ctrl-C checkpoint and finishes.
    config = write_configs(tmp_path, tiny_sd3_path, steps=saved[0] + 3, validation=False,
                           checkpointing_steps=100000)
    proc = _cli(config, store)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log
    assert f"resuming from checkpoint-{saved[0]}" in log


def test_caches_filled_during_training_or_not_at_all(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from stagetune.core.cache import ShardedCache

    make_dataset(tmp_path / "data")
    store_url = str(tmp_path / "store")
    config = write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False,
                           vae_cache_ondemand=True, text_cache_ondemand=True)
    run = train_embedded(config, store_url)
    for stage in ("vae", "text"):  # nothing encoded before training …
        assert run.phase(stage).outputs["encoded"] == "0" and run.phase(stage).outputs["hits"] == "0"
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    store = open_store(store_url)
    latents = ShardedCache(store, run.phase("vae").outputs["cache_prefix"])
    latents.refresh()
    assert len(latents) == 8  # … every latent the trainer needed was encoded and written back
    rerun = train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False,
                                         output_dir=str(tmp_path / "rerun")), store_url)
    assert rerun.phase("vae").outputs["encoded"] == "0" and rerun.phase("vae").outputs["hits"] == "8"

    # vae_cache_disable: encode during training, never write.
    other = tmp_path / "other"
    other.mkdir()
    config = write_configs(other, tiny_sd3_path, steps=4, validation=False, vae_cache_disable=True,
                           data_backend_config=str(tmp_path / "multidatabackend.json"))
    run = train_embedded(config, str(other / "store"))
    assert (other / "output" / "pytorch_lora_weights.safetensors").exists()
    latents = ShardedCache(open_store(str(other / "store")), run.phase("vae").outputs["cache_prefix"])
    latents.refresh()
    assert len(latents) == 0


def test_regularisation_data_is_trained_towards_the_base_model(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """LoRA starts as a no-op (B = 0), so on regularisation data, whose target is the base model's own
    prediction, the loss is exactly zero and stays there; on ordinary data it is not."""
    make_dataset(tmp_path / "data")
    losses: dict[bool, list[float]] = {}
    for regularisation in (True, False):
        root = tmp_path / f"reg-{regularisation}"
        root.mkdir()
        config = write_configs(root, tiny_sd3_path, steps=3, validation=False,
                               data_backend_config=str(root / "multidatabackend.json"))
        backends = json.loads((root / "multidatabackend.json").read_text())
        backends[0]["instance_data_dir"] = str(tmp_path / "data")
        backends[0]["is_regularisation_data"] = regularisation
        (root / "multidatabackend.json").write_text(json.dumps(backends))
        seen: list[float] = []
        servers = start_embedded(open_store(str(root / "store")))
        try:
            run_training(config, {n: s.address for n, s in servers.items()},
                         on_event=lambda phase, e, seen=seen: seen.append(e.metric.value)
                         if phase == "trainer" and e.WhichOneof("body") == "metric" and e.metric.name == "loss"
                         else None)
        finally:
            for server in servers.values():
                server.stop(0)
        losses[regularisation] = seen
    assert losses[True] == [0.0, 0.0, 0.0]
    assert len(losses[False]) == 3 and min(losses[False]) > 0


def test_debug_logging_cli_run_loads_models_while_libraries_import(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """At DEBUG the libraries are not imported up front: the vae and text stages load their models while the
    warm-up thread still imports diffusers, which once raised "cannot import name 'AutoencoderKL'"."""
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=1, validation=False)
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path / "store"))
    done = subprocess.run([sys.executable, "-m", "stagetune.cli", "--log-level", "DEBUG", "train", "--config",
                           str(config)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()

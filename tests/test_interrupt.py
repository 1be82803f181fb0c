"""Ctrl-C during ingest or encoding stops at the next file or batch, keeps every finished shard, and the
process exits promptly (it used to encode on for 5-10 s, and never cancelled the encoder it was not
following)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stagetune.core.cache import ShardedCache
from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.jobs import JobCancelled
from stagetune.core.store import open_store
from stagetune.core.store.local import LocalStore
from stagetune.ingest.run import run_ingest

IMAGES = 120


def _dataset(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"picture number {i}")


def test_ctrl_c_while_encoding_stops_at_the_next_batch_and_keeps_shards(tmp_path: Path, tiny_sd3_path: Path) -> None:
    _dataset(tmp_path / "data", IMAGES)
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        # 512 px crops of small images: each VAE batch takes a noticeable time on a CPU
        {"id": "noise", "instance_data_dir": str(tmp_path / "data"), "caption_strategy": "textfile",
         "resolution": 512, "resolution_type": "pixel_area", "crop": True, "crop_aspect": "square"},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "write_batch_size": 8},
    ]))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": str(tiny_sd3_path),
        "output_dir": str(tmp_path / "output"), "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "max_train_steps": 2, "train_batch_size": 1, "vae_batch_size": 2, "write_batch_size": 4,
        "tokenizer_max_length": 77, "optimizer": "adamw", "resume_from_checkpoint": "latest",
    }))
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path / "store"))
    proc = subprocess.Popen([sys.executable, "-m", "stagetune.cli", "train", "--config", str(tmp_path / "config.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stdout.read(64), "")), daemon=True)
    reader.start()
    encoding = re.compile(r"vae: encoding latents:\s+\d+%\|[^|]*\|\s+([1-9]\d*)/")
    deadline = time.time() + 300
    while not encoding.search("".join(seen)) and time.time() < deadline:
        assert proc.poll() is None, "".join(seen)
        time.sleep(0.05)
    time.sleep(1.0)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stopped_after = time.monotonic() - started
    reader.join(timeout=10)
    log = "".join(seen)
    assert proc.returncode == 130, log
    assert "interrupted: finished shards" in log and "Traceback" not in log
    # Not a speed target: encoding the rest would take tens of seconds; a cancelled run is gone in a few.
    assert stopped_after < 10, f"the run went on for {stopped_after:.1f}s after Ctrl-C"
    assert not (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()

    store = open_store(str(tmp_path / "store"))
    (prefix,) = {key.split("/shards/")[0] for key in store.list("cache/vae/") if "/shards/" in key}
    cache = ShardedCache(store, prefix)
    cache.refresh()
    kept = len(cache)
    assert 0 < kept < IMAGES, kept  # stopped part-way, finished shards kept
    for key in list(cache.keys()):
        assert cache.get(key)["latents"].shape[0] == 16  # every kept entry reads back whole
    assert not list((tmp_path / "output" / ".stagetune" / "leases" / "run").glob("claim-*"))  # lock released


def test_cancelled_ingest_writes_no_manifest_and_touches_no_file(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", 20)
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}
    backends = load_data_backend_config([
        {"id": "d", "instance_data_dir": str(tmp_path / "data"), "caption_strategy": "textfile"},
        {"id": "t", "dataset_type": "text_embeds"}])
    seen = []

    def progress(phase: str, done: int, total: int) -> None:
        seen.append(done)
        if phase == "scan" and done == 7:
            raise JobCancelled("ingest")  # what JobContext.progress raises once Cancel arrives

    store = LocalStore(tmp_path / "store", fsync=False)
    with pytest.raises(JobCancelled):
        run_ingest(backends, store, train_batch_size=1, progress=progress)
    assert max(seen) == 7
    assert not list(store.list("manifests/")) or not [k for k in store.list("manifests/") if k.endswith("report.json")]
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before

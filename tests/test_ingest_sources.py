"""Ingest through dataset sources: unchanged files are never re-read; S3 datasets train end to end."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from test_end_to_end import CAPTIONS, make_dataset, train_embedded, use_s3_dataset, write_configs

from stagetune.core import sources
from stagetune.core.cache import ShardedCache
from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.store import open_store
from stagetune.core.store.local import LocalStore
from stagetune.ingest.run import run_ingest

TEXT = {"id": "t", "type": "local", "dataset_type": "text_embeds", "default": True}


def _age(path: Path, seconds: int) -> None:
    when = time.time() - seconds
    for file in [path] if path.is_file() else path.iterdir():
        os.utime(file, (when, when))


def _count_image_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    original = sources.LocalSource.read

    def counting(self, path: str) -> bytes:  # noqa: ANN001
        if not path.endswith(".txt"):
            reads.append(path)
        return original(self, path)

    monkeypatch.setattr(sources.LocalSource, "read", counting)
    return reads


def test_reingesting_an_unchanged_dataset_reads_no_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "data")
    (tmp_path / "data" / "broken.png").write_bytes(b"not an image")
    _age(tmp_path / "data", 3600)  # files written just now are never vouched for (a same-second rewrite)
    backends = load_data_backend_config([
        {"id": "d", "type": "local", "instance_data_dir": str(tmp_path / "data"), "resolution": 64,
         "resolution_type": "pixel_area", "caption_strategy": "textfile"}, TEXT])
    store = LocalStore(tmp_path / "store")
    reads = _count_image_reads(monkeypatch)
    first = run_ingest(backends, store, train_batch_size=1)
    assert len(reads) == 9 and len(first.samples) == 8 and len(first.report["bad_files"]) == 1
    reads.clear()
    second = run_ingest(backends, store, train_batch_size=1)
    assert reads == [] and second.manifest_id == first.manifest_id
    assert second.report["bad_files"][0]["reason"] == first.report["bad_files"][0]["reason"]

    # A changed image is read again, alone; its new content changes the manifest.
    from PIL import Image

    Image.new("RGB", (200, 100), (1, 2, 3)).save(tmp_path / "data" / "image_0.png")
    _age(tmp_path / "data" / "image_0.png", 1800)
    third = run_ingest(backends, store, train_batch_size=1)
    assert reads == [str(tmp_path / "data" / "image_0.png")]
    assert third.manifest_id != first.manifest_id


@pytest.mark.parametrize("ondemand", [False, True], ids=["cached", "vae_cache_ondemand"])
def test_an_s3_dataset_trains_end_to_end(tmp_path: Path, tiny_sd3_path: Path, s3_server, ondemand: bool) -> None:
    """With vae_cache_ondemand the trainer reads the S3 images itself, with the dataset's aws_* keys."""
    make_dataset(tmp_path / "local")
    extra = {"vae_cache_ondemand": True} if ondemand else {}
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, validation=False, **extra)
    bucket = use_s3_dataset(tmp_path, s3_server, tmp_path / "local")
    s3_server.client().put_object(bucket, "sets/other/not-mine.png", io.BytesIO(b"x"), 1)  # outside the prefix
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("ingest").outputs["samples"] == "8"
    assert run.phase("vae").outputs["encoded"] == ("0" if ondemand else "8")
    if ondemand:
        latents = ShardedCache(open_store(str(tmp_path / "store")), run.phase("vae").outputs["cache_prefix"])
        latents.refresh()
        assert len(latents) >= 2  # the trainer encoded (and wrote back) what its 2 steps drew, from S3
    assert int(run.phase("text").outputs["total"]) == len(set(CAPTIONS) | {"", "blurry, cropped, ugly"})
    assert (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()

"""run_ingest end to end on generated images with an in-memory store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.errors import ConfigError, InputError, NotFoundError
from stagetune.core.imaging import load_image_rgb, prepare_pixels
from stagetune.core.manifest import pixel_key_for, sample_id_for
from stagetune.core.store.base import Store
from stagetune.ingest import expand_repeats, load_manifest, load_report, run_ingest

TEXT_EMBEDS = {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "write_batch_size": 128}
ROW_FIELDS = {
    "sample_id",
    "dataset_id",
    "path",
    "content_hash",
    "captions",
    "original_size",
    "downsample_size",
    "intermediary_size",
    "crop_box",
    "target_size",
    "bucket",
    "repeats",
    "is_regularisation_data",
    "pixel_key",
}


class MemoryStore(Store):
    url = "memory://test"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.writes: list[str] = []

    def put_bytes(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self.objects[key] = bytes(data)
        self.writes.append(key)

    def get_bytes(self, key: str) -> bytes:
        if key not in self.objects:
            raise NotFoundError(f"no object {key}", field=key)
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def list(self, prefix: str) -> Iterator[str]:
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


def _image(path: Path, size: tuple[int, int], colour=(120, 60, 30), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


def _backends(tmp_path: Path, *entries: dict):
    return load_data_backend_config([*entries, TEXT_EMBEDS], base_dir=tmp_path)


def _dataset(**kwargs) -> dict:
    base = {"id": "ds", "type": "local", "instance_data_dir": "data", "resolution": 256, "resolution_type": "pixel"}
    return {**base, **kwargs}


def test_filename_captions_rows_and_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "a_red_cat.png", (300, 400))
    _image(data / "sub" / "a_blue_dog.jpg", (400, 300))
    _image(data / "z_square.png", (256, 256))
    (data / "notes.md").write_text("not part of the dataset")
    store = MemoryStore()
    progress: list[tuple[str, int, int]] = []
    result = run_ingest(
        _backends(tmp_path, _dataset()),
        store,
        train_batch_size=1,
        progress=lambda stage, done, total: progress.append((stage, done, total)),
    )
    assert not result.reused
    assert [r.path for r in result.samples] == [
        str(data / "a_red_cat.png"),
        str(data / "sub" / "a_blue_dog.jpg"),
        str(data / "z_square.png"),
    ]
    assert [r.captions for r in result.samples] == [["a red cat"], ["a blue dog"], ["z square"]]
    assert result.captions == ["a blue dog", "a red cat", "z square"]
    assert ("scan", 3, 3) in progress

    row = result.samples[0]
    assert set(row.to_dict()) == ROW_FIELDS
    assert row.dataset_id == "ds" and row.original_size == [300, 400]
    assert row.target_size == [256, 320] and row.bucket == "0.8"  # pixel: W=256, H=int(256/0.75)=341→320
    assert row.sample_id == sample_id_for("ds", "a_red_cat.png")
    assert row.pixel_key == pixel_key_for(
        row.content_hash, row.downsample_size, row.intermediary_size, row.crop_box, row.target_size
    )
    assert row.repeats == 0 and row.is_regularisation_data is False
    assert row["target_size"] == row.target_size and row.get("nope") is None  # dict-style access too
    with pytest.raises(KeyError):
        row["nope"]
    assert result.samples[2].bucket == "1.0" and result.samples[2].target_size == [256, 256]

    # the store holds exactly the two objects, as JSON lines + JSON report
    assert result.manifest_key == f"manifests/{result.manifest_id}/samples.jsonl"
    manifest_objects = {k for k in store.objects if not k.startswith(("manifests/hashcache/", "manifests/facts/"))}
    assert manifest_objects == {result.manifest_key, f"manifests/{result.manifest_id}/report.json"}
    lines = store.objects[result.manifest_key].decode().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["captions"] == ["a red cat"]
    assert load_manifest(store, result.manifest_id) == result.samples
    report = load_report(store, result.manifest_id)
    assert report["datasets"]["ds"]["discovered"] == 3 and report["datasets"]["ds"]["samples"] == 3
    assert report["buckets"]["ds"] == {
        "0.8": {"images": 1, "samples_with_repeats": 1},
        "1.0": {"images": 1, "samples_with_repeats": 1},
        "1.25": {"images": 1, "samples_with_repeats": 1},  # W=int(256·1.33)=340 → 320
    }

    # the VAE stage can apply the row exactly
    tensor = prepare_pixels(load_image_rgb(row.path), row)
    assert tuple(tensor.shape) == (3, 320, 256)


def test_reingest_is_idempotent_and_changes_when_data_or_options_change(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "one.png", (300, 300))
    backends = _backends(tmp_path, _dataset())
    store = MemoryStore()
    first = run_ingest(backends, store, train_batch_size=1)
    writes = len(store.writes)
    again = run_ingest(backends, store, train_batch_size=1)
    assert again.reused and again.manifest_id == first.manifest_id and again.samples == first.samples
    assert len(store.writes) == writes  # nothing rewritten
    # touching mtime only: same content, same id
    (data / "one.png").touch()
    assert run_ingest(backends, store, train_batch_size=1).manifest_id == first.manifest_id
    # new options or batch params or content → new id
    assert run_ingest(backends, store, train_batch_size=1, seed=5).manifest_id != first.manifest_id
    other = _backends(tmp_path, _dataset(resolution=320))
    assert run_ingest(other, store, train_batch_size=1).manifest_id != first.manifest_id
    _image(data / "one.png", (300, 300), colour=(1, 2, 3))
    changed = run_ingest(backends, store, train_batch_size=1)
    assert changed.manifest_id != first.manifest_id and not changed.reused
    with pytest.raises(NotFoundError):
        load_manifest(store, "0" * 32)


def test_textfile_captions_multiline_and_missing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "a.png", (256, 256))
    (data / "a.txt").write_text("first caption\r\n\nsecond caption\n")
    _image(data / "b.png", (256, 256))
    (data / "b.txt").write_text("only one")
    _image(data / "c.png", (256, 256))  # no caption file
    _image(data / "d.png", (256, 256))
    (data / "d.txt").write_text("\n \n")
    store = MemoryStore()
    result = run_ingest(_backends(tmp_path, _dataset(caption_strategy="textfile")), store, train_batch_size=1)
    assert [r.captions for r in result.samples] == [["first caption", "second caption"], ["only one"]]
    reasons = {Path(f["path"]).name: f["reason"] for f in result.report["filtered"]}
    assert reasons == {"c.png": "caption file missing: c.txt", "d.png": "caption file empty: d.txt"}
    # a caption edit changes the manifest id even though no image changed
    (data / "b.txt").write_text("edited")
    again = run_ingest(_backends(tmp_path, _dataset(caption_strategy="textfile")), store, train_batch_size=1)
    assert again.manifest_id != result.manifest_id and again.samples[1].captions == ["edited"]
    # disable_multiline_split keeps one caption
    single = run_ingest(
        _backends(tmp_path, _dataset(caption_strategy="textfile", disable_multiline_split=True)),
        store,
        train_batch_size=1,
    )
    assert single.samples[0].captions == ["first caption\r\n\nsecond caption"]


def test_instance_prompt_strategies(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "photo_of_x.png", (256, 256))
    store = MemoryStore()
    run = lambda **kw: run_ingest(_backends(tmp_path, _dataset(**kw)), store, train_batch_size=1).samples[0]  # noqa: E731
    assert run(caption_strategy="instanceprompt", instance_prompt="sks dog").captions == ["sks dog"]
    assert run(instance_prompt="sks dog", prepend_instance_prompt=True).captions == ["sks dog photo of x"]
    assert run(instance_prompt="sks dog", only_instance_prompt=True).captions == ["sks dog"]
    assert run(caption_strategy="instanceprompt", instance_prompt=["a", "b"]).captions == ["a", "b"]


def test_repeats_and_pruning_messages(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(5):
        _image(data / f"sq{i}.png", (256, 256))
    for i in range(3):
        _image(data / f"wide{i}.png", (512, 256))
    _image(data / "tall.png", (256, 512))
    store = MemoryStore()
    # effective batch = 2 × 2 GPUs × 2 accumulation = 8; with repeats=1: sq 10 ok, wide 6, tall 2 dropped
    result = run_ingest(
        _backends(tmp_path, _dataset(repeats=1, is_regularisation_data=True)),
        store,
        train_batch_size=2,
        world_size=2,
        gradient_accumulation_steps=2,
    )
    assert {r.bucket for r in result.samples} == {"1.0"}
    assert len(result.samples) == 5 and result.num_samples_with_repeats == 10
    assert all(r.repeats == 1 and r.is_regularisation_data for r in result.samples)
    assert len(expand_repeats(result.samples)) == 10
    pruned = {p["bucket"]: p for p in result.report["pruned_buckets"]}
    assert set(pruned) == {"2.0", "0.5"}
    wide = pruned["2.0"]
    assert (wide["images"], wide["samples_with_repeats"], wide["effective_batch_size"]) == (3, 6, 8)
    assert wide["repeats_needed"] == 2  # 3 × 3 = 9 ≥ 8
    assert "repeats ≥ 2 would keep it" in wide["message"] and "'ds'" in wide["message"]
    assert pruned["0.5"]["repeats_needed"] == 7  # 1 × 8
    assert result.report["datasets"]["ds"]["pruned"] == 4
    assert result.report["effective_batch_size"] == 8

    # repeats: 0 means each sample once
    once = run_ingest(_backends(tmp_path, _dataset(repeats=0)), store, train_batch_size=5)
    assert once.num_samples_with_repeats == 5 and {r.bucket for r in once.samples} == {"1.0"}


def test_bad_files_reported_not_fatal_not_deleted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _image(data / "good.png", (256, 256))
    (data / "empty.png").write_bytes(b"")
    (data / "text.png").write_text("hello, I am not a PNG")
    full = (_image(tmp_path / "src.jpg", (256, 256))).read_bytes()
    (data / "truncated.jpg").write_bytes(full[: len(full) // 2])
    _image(data / "small.png", (100, 100))
    before = sorted(p.name for p in data.iterdir())
    store = MemoryStore()
    result = run_ingest(_backends(tmp_path, _dataset(minimum_image_size=200)), store, train_batch_size=1)
    assert [Path(r.path).name for r in result.samples] == ["good.png"]
    bad = {Path(b["path"]).name: b["reason"] for b in result.report["bad_files"]}
    assert set(bad) == {"empty.png", "text.png", "truncated.jpg"}
    assert "empty" in bad["empty.png"] and "not an image" in bad["text.png"] and "truncated" in bad["truncated.jpg"]
    assert all(str(data) in b["path"] for b in result.report["bad_files"])
    filtered = {Path(f["path"]).name: f["reason"] for f in result.report["filtered"]}
    assert "minimum_image_size" in filtered["small.png"]
    assert sorted(p.name for p in data.iterdir()) == before  # nothing deleted
    assert not any(b["deleted"] for b in result.report["bad_files"])
    assert result.report["datasets"]["ds"] == {
        "discovered": 5,
        "max_num_samples_skipped": 0,
        "bad": 3,
        "filtered": 1,
        "pruned": 0,
        "samples": 1,
        "samples_with_repeats": 1,
        "effective_batch_size": 1,
        "sampling": {
            "probability": 1.0,
            "start_step": 0,
            "end_step": None,
            "train_batch_size": 1,
            "is_regularisation_data": False,
            "vae_cache_clear_each_epoch": False,
        },
        "crop_style": None,
    }


def test_exif_rotation_and_several_datasets(tmp_path: Path) -> None:
    data = tmp_path / "data"
    image = Image.new("RGB", (400, 256), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    data.mkdir()
    image.save(data / "rotated.jpg", exif=exif.tobytes())
    other = tmp_path / "other"
    _image(other / "x.png", (256, 256))
    backends = _backends(
        tmp_path,
        _dataset(),
        _dataset(id="second", instance_data_dir=str(other), crop=True, crop_style="random"),
        _dataset(id="off", instance_data_dir="nowhere", disabled=True),
    )
    result = run_ingest(backends, MemoryStore(), train_batch_size=1)
    rotated, square = result.samples
    assert rotated.original_size == [256, 400] and rotated.dataset_id == "ds"
    assert square.dataset_id == "second" and square.sample_id == sample_id_for("second", "x.png")
    assert set(result.report["datasets"]) == {"ds", "second"}
    tensor = prepare_pixels(load_image_rgb(rotated.path), rotated)
    assert tuple(tensor.shape) == (3, rotated.target_size[1], rotated.target_size[0])


def test_errors_for_missing_folder_and_batch_params(tmp_path: Path) -> None:
    backends = _backends(tmp_path, _dataset(instance_data_dir="missing"))
    with pytest.raises(InputError, match="'ds'.*not a folder"):
        run_ingest(backends, MemoryStore(), train_batch_size=1)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="train_batch_size"):
        run_ingest(_backends(tmp_path, _dataset()), MemoryStore(), train_batch_size=0)

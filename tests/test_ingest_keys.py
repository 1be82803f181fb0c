"""Per-dataset keys of multidatabackend.json as ingest applies (or records) them."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from stagetune.core.config.dataset import SAMPLING_KEYS, load_data_backend_config
from stagetune.core.errors import ConfigError, InputError, NotSupportedError
from stagetune.core.store.local import LocalStore
from stagetune.ingest import run_ingest
from stagetune.ingest.buckets import BucketPlanner, crop_box, shuffle_bucket, split_for_rank

TEXT_EMBEDS = {"id": "text-embeds", "dataset_type": "text_embeds", "default": True}


def _image(path: Path, size: tuple[int, int], colour: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, colour).save(path)
    return path


def _entry(**kwargs) -> dict:
    return {"id": "ds", "instance_data_dir": "data", "resolution": 512, "resolution_type": "pixel", **kwargs}


def _load(tmp_path: Path, *entries: dict, defaults: dict | None = None):
    return load_data_backend_config([*entries, TEXT_EMBEDS], base_dir=tmp_path, defaults=defaults)


def _store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


# ---------------------------------------------------------------------------------------------------
# aspect limits


def test_minimum_and_maximum_aspect_ratio_filter_by_bucket(tmp_path: Path) -> None:
    _image(tmp_path / "data/square.png", (600, 600))
    _image(tmp_path / "data/wide.png", (1200, 600))
    _image(tmp_path / "data/tall.png", (600, 1200))
    backends = _load(tmp_path, _entry(minimum_aspect_ratio=0.75, maximum_aspect_ratio=1.5))
    result = run_ingest(backends, _store(tmp_path), train_batch_size=1)
    assert [Path(r.path).name for r in result.samples] == ["square.png"]
    reasons = {Path(f["path"]).name: f["reason"] for f in result.report["filtered"]}
    assert reasons["wide.png"] == "bucket 2.0 above maximum_aspect_ratio 1.5"
    assert reasons["tall.png"] == "bucket 0.5 below minimum_aspect_ratio 0.75"


# ---------------------------------------------------------------------------------------------------
# crop_style / crop_aspect


def test_crop_style_corner_takes_the_top_left(tmp_path: Path) -> None:
    assert crop_box((900, 600), (512, 512), "corner") == (0, 0, 512, 512)
    assert crop_box((300, 600), (512, 512), "corner") == (0, 0, 300, 512)
    config = _load(tmp_path, _entry(crop=True, crop_style="corner", crop_aspect="square")).datasets[0]
    geometry = BucketPlanner().plan(config, (1000, 700))
    assert geometry.target_size == (512, 512)
    assert geometry.crop_box[:2] == (0, 0)
    assert geometry.crop_box[2:] == (512, 512)
    with pytest.raises(NotSupportedError, match="crop_style='face'"):
        _load(tmp_path, _entry(crop_style="face"))


def test_crop_aspect_closest_picks_nearest_listed_aspect(tmp_path: Path) -> None:
    entry = _entry(crop=True, crop_aspect="closest", crop_aspect_buckets=[0.75, 1.0, 1.5])
    config = _load(tmp_path, entry).datasets[0]
    planner = BucketPlanner()
    wide = planner.plan(config, (1600, 1000))  # ar 1.6 → 1.5: H = 512, W = int(512 × 1.5) = 768
    assert (wide.bucket, wide.target_size) == ("1.5", (768, 512))
    tall = planner.plan(config, (700, 1000))  # ar 0.7 → 0.75: W = 512, H = int(512 / 0.75) = 682 → 704
    assert (tall.bucket, tall.target_size) == ("0.73", (512, 704))
    # a tie goes to the first listed aspect, as Python's min() in SimpleTuner
    tie = _load(tmp_path, _entry(crop=True, crop_aspect="closest", crop_aspect_buckets=[1.0, 2.0])).datasets[0]
    assert BucketPlanner().plan(tie, (1500, 1000)).bucket == "1.0"
    # without crop SimpleTuner does not pick from the list: the image keeps its own aspect
    no_crop = _load(tmp_path, _entry(crop=False, crop_aspect="closest", crop_aspect_buckets=[1.0])).datasets[0]
    assert BucketPlanner().plan(no_crop, (1600, 1000)).bucket == "1.62"  # 832x512


def test_crop_aspect_random_is_deterministic_and_uses_every_listed_aspect(tmp_path: Path) -> None:
    entry = _entry(crop=True, crop_aspect="random", crop_aspect_buckets=[0.5, 1.0, 2.0])
    config = _load(tmp_path, entry).datasets[0]
    planner = BucketPlanner()
    picks = [planner.select_aspect(config, (2000, 2000), content_hash=f"h{i}", seed=7) for i in range(300)]
    assert set(picks) == {0.5, 1.0, 2.0}
    assert min(Counter(picks).values()) > 60  # uniform draw
    again = [planner.select_aspect(config, (2000, 2000), content_hash=f"h{i}", seed=7) for i in range(300)]
    assert again == picks
    other_seed = [planner.select_aspect(config, (2000, 2000), content_hash=f"h{i}", seed=8) for i in range(300)]
    assert other_seed != picks
    chosen = planner.plan(config, (2000, 2000), content_hash="h0", seed=7)
    assert float(chosen.bucket) == picks[0]


def test_crop_aspect_random_weighted(tmp_path: Path) -> None:
    buckets = [{"aspect": 1.0, "weight": 0.9}, {"aspect": 2.0, "weight": 0.1}]
    config = _load(tmp_path, _entry(crop=True, crop_aspect="random", crop_aspect_buckets=buckets)).datasets[0]
    planner = BucketPlanner()
    picks = Counter(planner.select_aspect(config, (3000, 3000), content_hash=f"x{i}") for i in range(2000))
    assert set(picks) == {1.0, 2.0}
    assert 0.86 < picks[1.0] / 2000 < 0.94


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"crop_aspect": "random"}, "crop_aspect_buckets"),
        ({"crop_aspect": "closest", "crop_aspect_buckets": []}, "crop_aspect_buckets"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [{"aspect": 1.0, "weight": 0.5}]}, "crop_aspect_buckets"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [1, {"aspect": 2, "weight": 1}]}, "crop_aspect_buckets"),
        ({"crop_aspect": "random", "crop_aspect_buckets": ["wide"]}, "crop_aspect_buckets"),
        ({"crop_aspect": "random", "crop_aspect_buckets": [0]}, "crop_aspect_buckets"),
        ({"max_upscale_threshold": -0.1}, "max_upscale_threshold"),
    ],
)
def test_crop_aspect_bucket_errors(tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _entry(crop=True, **changes))
    assert info.value.field == field


def test_max_upscale_threshold_limits_random_aspects(tmp_path: Path) -> None:
    # DATALOADER.md's example: pixel 1024, random among [1.0, 0.5, 2.0], threshold 0.2
    entry = _entry(
        resolution=1024, crop=True, crop_aspect="random", crop_aspect_buckets=[1.0, 0.5, 2.0], max_upscale_threshold=0.2
    )
    config = _load(tmp_path, entry).datasets[0]
    planner = BucketPlanner()
    # 860 px: 1.0 → 1024x1024 and 0.5 → 512x1024 stay ≤ 860 × 1.2 = 1032; 2.0 → 2048x1024 does not
    assert planner._aspects_within_upscale(config, (860, 860)) == [1.0, 0.5]
    picks = {planner.select_aspect(config, (860, 860), content_hash=f"h{i}") for i in range(100)}
    assert picks == {1.0, 0.5}
    # 850 px: 1024 > 850 × 1.2 = 1020 for every aspect → SimpleTuner's fallback, the square bucket
    assert planner._aspects_within_upscale(config, (850, 850)) == []
    assert planner.select_aspect(config, (850, 850), content_hash="a") == 1.0
    assert planner.upscale_fallbacks == {"ds": 1}
    # without a threshold every aspect is allowed
    unlimited = _load(tmp_path, {**entry, "max_upscale_threshold": None}).datasets[0]
    assert planner._aspects_within_upscale(unlimited, (256, 256)) == [1.0, 0.5, 2.0]


def test_max_upscale_threshold_fallbacks_and_no_effect_are_reported(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"data/small{i}.png", (300, 300), colour=i * 40)
    _image(tmp_path / "data/big.png", (2400, 2400))
    entry = _entry(
        resolution=1024, crop=True, crop_aspect="random", crop_aspect_buckets=[1.0, 0.5, 2.0], max_upscale_threshold=0.2
    )
    result = run_ingest(_load(tmp_path, entry), _store(tmp_path), train_batch_size=1)
    assert result.report["datasets"]["ds"]["upscale_fallbacks"] == 3
    assert any("3 image(s) fit no crop_aspect_buckets entry" in w for w in result.report["warnings"])
    small = [r for r in result.samples if "small" in r.path]
    assert {(r.bucket, tuple(r.target_size)) for r in small} == {("1.0", (1024, 1024))}

    closest = {**entry, "crop_aspect": "closest"}
    result = run_ingest(_load(tmp_path, closest), _store(tmp_path), train_batch_size=1)
    assert any("max_upscale_threshold has no effect with crop_aspect=closest" in w for w in result.report["warnings"])


# ---------------------------------------------------------------------------------------------------
# max_num_samples


def test_max_num_samples_picks_simpletuners_deterministic_subset(tmp_path: Path) -> None:
    for i in range(20):
        _image(tmp_path / f"data/img{i:02d}.png", (512, 512), colour=i * 10)
    backends = _load(tmp_path, _entry(max_num_samples=7))
    first = run_ingest(backends, _store(tmp_path), train_batch_size=1)
    second = run_ingest(backends, LocalStore(tmp_path / "other", fsync=False), train_batch_size=1)
    assert len(first.samples) == 7
    assert [r.path for r in first.samples] == [r.path for r in second.samples]
    # SimpleTuner's _apply_max_num_samples_limit: sorted absolute paths, Random(dataset id).shuffle, first N
    paths = sorted(str((tmp_path / "data" / f"img{i:02d}.png").resolve()) for i in range(20))
    random.Random("ds").shuffle(paths)
    assert sorted(r.path for r in first.samples) == sorted(paths[:7])
    assert first.report["datasets"]["ds"]["max_num_samples_skipped"] == 13
    assert first.report["datasets"]["ds"]["discovered"] == 20
    everything = run_ingest(_load(tmp_path, _entry(max_num_samples=0)), _store(tmp_path), train_batch_size=1)
    assert len(everything.samples) == 20
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _entry(max_num_samples=2.5))
    assert info.value.field == "max_num_samples"


# ---------------------------------------------------------------------------------------------------
# sampler settings: validated and recorded


def test_sampling_settings_are_recorded_per_dataset(tmp_path: Path) -> None:
    for i in range(4):
        _image(tmp_path / f"a/img{i}.png", (512, 512), colour=i)
        _image(tmp_path / f"b/img{i}.png", (512, 512), colour=100 + i)
    first = _entry(id="lowres", instance_data_dir="a", probability=0.25, end_step=300, vae_cache_clear_each_epoch=True)
    second = _entry(
        id="highres", instance_data_dir="b", start_step=300, train_batch_size=2, is_regularization_data=True
    )
    result = run_ingest(_load(tmp_path, first, second), _store(tmp_path), train_batch_size=4)
    sampling = {k: v["sampling"] for k, v in result.report["datasets"].items()}
    assert sampling == {
        "lowres": {
            "probability": 0.25,
            "start_step": 0,
            "end_step": 300,
            "train_batch_size": 4,
            "is_regularisation_data": False,
            "vae_cache_clear_each_epoch": True,
        },
        "highres": {
            "probability": 1.0,
            "start_step": 300,
            "end_step": None,
            "train_batch_size": 2,
            "is_regularisation_data": True,
            "vae_cache_clear_each_epoch": False,
        },
    }
    assert all(set(s) == set(SAMPLING_KEYS) for s in sampling.values())
    assert all(r.is_regularisation_data == (r.dataset_id == "highres") for r in result.samples)
    # a changed sampling value makes a new manifest, so a reused report is never stale
    changed = run_ingest(
        _load(tmp_path, {**first, "probability": 0.5}, second), _store(tmp_path), train_batch_size=4
    )
    assert changed.manifest_id != result.manifest_id and not changed.reused
    assert changed.report["datasets"]["lowres"]["sampling"]["probability"] == 0.5


def test_per_dataset_train_batch_size_sets_the_bucket_minimum(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"data/img{i}.png", (512, 512), colour=i)
    with pytest.raises(InputError) as info:  # the only bucket is dropped: nothing left to train on
        run_ingest(_load(tmp_path, _entry(train_batch_size=4)), _store(tmp_path), train_batch_size=1)
    assert "dataset 'ds'" in str(info.value) and info.value.field == "ds"
    assert "train_batch_size 4" in str(info.value) and "repeats ≥ 1 would keep it" in str(info.value)
    for i in range(4):  # a second bucket that fills a batch of 4: the dataset trains, the square bucket is dropped
        _image(tmp_path / f"data/wide{i}.png", (1024, 512), colour=10 + i)
    result = run_ingest(_load(tmp_path, _entry(train_batch_size=4)), _store(tmp_path), train_batch_size=1)
    (pruned,) = [p for p in result.report["pruned_buckets"] if p["bucket"] == "1.0"]
    assert (pruned["effective_batch_size"], pruned["repeats_needed"]) == (4, 1)
    assert result.report["datasets"]["ds"]["effective_batch_size"] == 4
    kept = run_ingest(_load(tmp_path, _entry(train_batch_size=3)), _store(tmp_path), train_batch_size=8)
    assert len(kept.samples) == 7  # batch 3: both buckets are kept whole (the sampler drops short batches)


@pytest.mark.parametrize(
    ("entries", "field"),
    [
        ([_entry(start_step=200, end_step=100)], "end_step"),
        ([_entry(start_step=5)], "start_step"),
        ([_entry(start_step=-1)], "start_step"),
        ([_entry(end_step="soon")], "end_step"),
        ([_entry(probability=-1)], "probability"),
        ([_entry(probability=0)], "probability"),
        ([_entry(train_batch_size=1.5)], "train_batch_size"),
        ([_entry(vae_cache_clear_each_epoch="sometimes")], "vae_cache_clear_each_epoch"),
        ([_entry(skip_file_discovery="vae bogus")], "skip_file_discovery"),
        ([_entry(preserve_data_backend_cache="maybe")], "preserve_data_backend_cache"),
        ([_entry(delete_problematic_images="yes please")], "delete_problematic_images"),
    ],
)
def test_sampling_and_recorded_key_errors(tmp_path: Path, entries: list[dict], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, *entries)
    assert info.value.field == field


def test_sampling_defaults_and_simpletuner_normalisation(tmp_path: Path) -> None:
    ds = _load(tmp_path, _entry(end_step=0, probability=None, train_batch_size=0)).datasets[0]
    assert (ds.end_step, ds.probability, ds.train_batch_size) == (None, 1.0, None)
    # probability 0 is kept (that dataset is never drawn) as long as another dataset can be drawn
    backends = _load(tmp_path, _entry(), _entry(id="never", probability=0))
    assert backends.get("never").probability == 0.0


def test_recorded_keys_do_not_change_the_manifest(tmp_path: Path) -> None:
    _image(tmp_path / "data/a.png", (512, 512))
    plain = run_ingest(_load(tmp_path, _entry()), _store(tmp_path), train_batch_size=1)
    entry = _entry(skip_file_discovery="vae, aspect metadata", preserve_data_backend_cache=True)
    backends = _load(tmp_path, entry)
    assert backends.datasets[0].skip_file_discovery == "vae aspect metadata"
    assert backends.datasets[0].preserve_data_backend_cache is True
    again = run_ingest(backends, _store(tmp_path), train_batch_size=1)
    assert again.manifest_id == plain.manifest_id and again.reused


# ---------------------------------------------------------------------------------------------------
# delete_problematic_images


def _bad_dataset(folder: Path) -> None:
    _image(folder / "good.png", (512, 512))
    (folder / "good.txt").write_text("a caption")
    (folder / "broken.png").write_text("not a png")
    (folder / "broken.txt").write_text("its caption")
    full = _image(folder.parent / "whole.png", (512, 512)).read_bytes()
    (folder / "cut.png").write_bytes(full[: len(full) // 2])


def test_delete_problematic_images_only_when_set(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _bad_dataset(data)
    before = sorted(p.name for p in data.iterdir())
    kept = run_ingest(_load(tmp_path, _entry()), _store(tmp_path), train_batch_size=1)
    assert sorted(p.name for p in data.iterdir()) == before
    assert {Path(b["path"]).name: b["deleted"] for b in kept.report["bad_files"]} == {
        "broken.png": False,
        "cut.png": False,
    }

    result = run_ingest(_load(tmp_path, _entry(delete_problematic_images=True)), _store(tmp_path), train_batch_size=1)
    assert {Path(b["path"]).name: b["deleted"] for b in result.report["bad_files"]} == {
        "broken.png": True,
        "cut.png": True,
    }
    # only the bad images go: good files and every caption file stay
    assert sorted(p.name for p in data.iterdir()) == ["broken.txt", "good.png", "good.txt"]
    assert [Path(r.path).name for r in result.samples] == ["good.png"]


def test_delete_problematic_images_inherits_config_json(tmp_path: Path) -> None:
    backends = _load(tmp_path, _entry(), defaults={"--delete_problematic_images": True})
    assert backends.datasets[0].delete_problematic_images is True
    overridden = _load(tmp_path, _entry(delete_problematic_images=False), defaults={"delete_problematic_images": True})
    assert overridden.datasets[0].delete_problematic_images is False


# ---------------------------------------------------------------------------------------------------
# per-rank split


def test_split_for_rank_gives_every_rank_the_same_whole_batches() -> None:
    samples = list(range(10))
    # per-rank batch 1 (effective 4 over 4 ranks): contiguous slices 3,3,2,2 cut to 2 each
    shares = [split_for_rank(samples, rank, 4, 4) for rank in range(4)]
    assert shares == [[0, 1], [3, 4], [6, 7], [8, 9]]
    # with SimpleTuner's padding every rank holds ceil(10 / 4) = 3 (the short ranks repeat the last sample)
    padded = [split_for_rank(samples, rank, 4, 4, pad=True) for rank in range(4)]
    assert padded == [[0, 1, 2], [3, 4, 5], [6, 7, 9], [8, 9, 9]]
    # per-rank batch 2 × 2 accumulation: whole batches of 4 per rank
    assert [split_for_rank(list(range(20)), r, 2, 8) for r in range(2)] == [list(range(8)), list(range(10, 18))]
    assert [split_for_rank(list(range(7)), r, 2, 8) for r in range(2)] == [[], []]
    assert [split_for_rank(list(range(7)), r, 2, 8, pad=True) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 6]]


@pytest.mark.parametrize("count", [0, 1, 5, 16, 17, 31, 100, 257])
@pytest.mark.parametrize(("world_size", "per_rank"), [(1, 1), (2, 2), (3, 4), (8, 1)])
def test_split_for_rank_properties(count: int, world_size: int, per_rank: int) -> None:
    samples = [f"s{i}" for i in range(count)]
    shares = [split_for_rank(samples, r, world_size, per_rank * world_size) for r in range(world_size)]
    lengths = {len(s) for s in shares}
    assert len(lengths) == 1 and lengths.pop() % per_rank == 0
    flat = [s for share in shares for s in share]
    assert len(flat) == len(set(flat))  # no sample on two ranks without padding
    assert len(flat) >= count - world_size * per_rank - world_size  # at most one batch and a sample lost per rank


def test_split_for_rank_errors_and_shuffle() -> None:
    with pytest.raises(ValueError, match="rank"):
        split_for_rank([1, 2], 2, 2, 2)
    with pytest.raises(ValueError, match="multiple"):
        split_for_rank([1, 2], 0, 2, 3)
    with pytest.raises(ValueError, match="world_size"):
        split_for_rank([1, 2], 0, 0, 2)
    items = [f"img{i}.png" for i in range(12)]
    expected = sorted(items)
    random.Random("42:ds:1.0").shuffle(expected)
    assert shuffle_bucket(reversed(items), seed=42, dataset_id="ds", bucket="1.0") == expected

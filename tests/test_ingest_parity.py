"""Bucket parity: ingest's bucketing against a literal transcription of DESIGN.md §6.

The transcription below is written from the design page's text alone (not from `buckets.py`), so a change
to the planner that moves a picture to another bucket or size fails here. The sizes go through the same
code path ingest uses: `load_data_backend_config` → `BucketPlanner.plan`, one planner per run (its size
memory is per run, as SimpleTuner's), images in listing order.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from PIL import Image

from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.store.local import LocalStore
from stagetune.ingest import run_ingest
from stagetune.ingest.buckets import BucketPlanner

TEXT_EMBEDS = {"id": "text-embeds", "dataset_type": "text_embeds", "default": True}

# ---------------------------------------------------------------------------------------------------
# DESIGN.md §6, transcribed.


def _rtm(v: float) -> int:
    # rtm(v) = max(round(v / 64) * 64, 64)   (Python's round)
    return max(round(v / 64) * 64, 64)


class Section6:
    """One ingest run's worth of §6 rules at one resolution: remembers the first size per key."""

    def __init__(self, resolution_type: str, edge_px: int) -> None:
        self.resolution_type = resolution_type
        self.edge_px = edge_px
        self.remembered: dict[float, tuple[int, int]] = {}

    def bucket(self, width: int, height: int) -> tuple[float, tuple[int, int]]:
        ar = round(width / height, 2)
        if self.resolution_type == "pixel":
            e = self.edge_px
            if width < height:
                w, h = e, int(e / ar)
            else:
                h, w = e, int(e * ar)
            w, h = _rtm(w), _rtm(h)
            return round(w / h, 2), (w, h)
        megapixels = self.edge_px**2 / 1e6  # pixel_area E means E²/1e6 MP; area is given in MP directly
        edge = _rtm(int(math.sqrt(megapixels * 1e6)))
        if width == height:
            return 1.0, (edge, edge)
        w = _rtm(edge * math.sqrt(ar))
        h = _rtm(edge / math.sqrt(ar))
        key = round(w / h, 2)
        if key in self.remembered:
            return key, self.remembered[key]
        self.remembered[key] = (w, h)
        return key, (w, h)


# ---------------------------------------------------------------------------------------------------


def _sizes() -> list[tuple[int, int]]:
    """320 awkward sizes: common camera/phone aspects with noise, near-squares, extremes, tiny and odd ones."""
    rng = random.Random(20240611)
    sizes: list[tuple[int, int]] = [
        (512, 512), (1024, 1024), (1000, 1000), (3000, 3000), (1, 1),
        (1001, 1000), (1000, 1001), (1005, 1000), (1000, 1005), (995, 1000),
        (4000, 500), (500, 4000), (64, 4096), (4096, 64), (10, 7), (7, 10),
        (1536, 1024), (1024, 1536), (1920, 1080), (1080, 1920), (3024, 4032), (4032, 3024),
        (1344, 768), (768, 1344), (1152, 896), (896, 1152), (833, 1216), (1216, 833),
        (2048, 1365), (1365, 2048), (6000, 4000), (4000, 6000), (1599, 899), (899, 1599),
        # ar 0.22 then 0.23: both key 0.24 at 1024 (512x2176, 512x2112): the second reuses the first size.
        (440, 2000), (460, 2000),
    ]  # fmt: skip
    aspects = [0.33, 0.5, 0.5625, 0.6, 0.667, 0.75, 0.8, 0.875, 1.0, 1.143, 1.25, 1.333, 1.5, 1.6, 1.778, 2.0, 2.4, 3.0]
    while len(sizes) < 320:
        aspect = rng.choice(aspects) * rng.uniform(0.97, 1.03)
        long_edge = rng.randint(96, 5000)
        if aspect >= 1:
            width, height = long_edge, max(1, round(long_edge / aspect))
        else:
            width, height = max(1, round(long_edge * aspect)), long_edge
        sizes.append((width, height))
    return sizes


SIZES = _sizes()
RUNS = [
    ("pixel", 512, 512),
    ("pixel", 1024, 1024),
    ("pixel_area", 512, 512),
    ("pixel_area", 1024, 1024),
    ("area", 512**2 / 1e6, 512),
    ("area", 1024**2 / 1e6, 1024),
]


def _config(tmp_path: Path, resolution_type: str, resolution: float, **extra):
    entry = {
        "id": "ds",
        "instance_data_dir": str(tmp_path),
        "resolution": resolution,
        "resolution_type": resolution_type,
        **extra,
    }
    return load_data_backend_config([entry, TEXT_EMBEDS], base_dir=tmp_path)


def test_sizes_are_many_and_varied() -> None:
    assert len(SIZES) >= 300
    assert len({round(w / h, 2) for w, h in SIZES}) > 60


@pytest.mark.parametrize(("resolution_type", "resolution", "edge_px"), RUNS)
def test_every_size_matches_section_6(tmp_path: Path, resolution_type: str, resolution: float, edge_px: int) -> None:
    config = _config(tmp_path, resolution_type, resolution).datasets[0]
    planner = BucketPlanner()
    reference = Section6(resolution_type, edge_px)
    mismatches = []
    for index, size in enumerate(SIZES):
        geometry = planner.plan(config, size, content_hash=f"h{index}")
        key, target = reference.bucket(*size)
        if float(geometry.bucket) != key or tuple(geometry.target_size) != target:
            mismatches.append((size, geometry.bucket, geometry.target_size, key, target))
    assert mismatches == []


def test_design_examples_at_1024() -> None:
    reference = Section6("pixel_area", 1024)
    assert reference.bucket(1200, 1600) == (0.78, (896, 1152))
    assert reference.bucket(1500, 1000) == (1.54, (1280, 832))
    assert reference.bucket(1780, 1000) == (1.75, (1344, 768))


def test_first_size_per_key_is_reused_in_the_size_list() -> None:
    reference = Section6("pixel_area", 1024)
    assert reference.bucket(440, 2000) == (0.24, (512, 2176))
    assert reference.bucket(460, 2000) == (0.24, (512, 2176))  # fresh, it would be 512x2112
    assert Section6("pixel_area", 1024).bucket(460, 2000) == (0.24, (512, 2112))


def _write_pngs(folder: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (width, height) in enumerate(sizes):
        Image.new("L", (width, height), (index * 37) % 256).save(folder / f"{index:03d}_{width}x{height}.png")


@pytest.mark.parametrize(("resolution_type", "resolution", "edge_px"), [RUNS[1], RUNS[3], RUNS[4]])
def test_real_files_through_run_ingest(tmp_path: Path, resolution_type: str, resolution: float, edge_px: int) -> None:
    # Small real files (ingest reads headers): every size ≤ 1600 px, listed in index order.
    sizes = [s for s in SIZES if max(s) <= 1600][:40]
    assert len(sizes) >= 30
    data = tmp_path / "data"
    _write_pngs(data, sizes)
    backends = _config(data, resolution_type, resolution)
    result = run_ingest(backends, LocalStore(tmp_path / "store", fsync=False), train_batch_size=1)
    assert len(result.samples) == len(sizes)
    reference = Section6(resolution_type, edge_px)
    for row, size in zip(result.samples, sizes, strict=True):
        assert tuple(row.original_size) == size
        key, target = reference.bucket(*size)
        assert (float(row.bucket), tuple(row.target_size)) == (key, target), row.path

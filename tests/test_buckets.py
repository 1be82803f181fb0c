"""Bucketing numbers from DESIGN.md §6 (checked there against SimpleTuner 4.10.1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagetune.core.config.dataset import DatasetConfig
from stagetune.ingest.buckets import (
    BucketPlanner,
    ResolutionMemory,
    crop_box,
    minimum_size_reason,
    repeats_needed,
    rtm,
    size_by_pixel_area,
    size_by_pixel_edge,
)


def _config(**kwargs) -> DatasetConfig:
    return DatasetConfig(id="d", instance_data_dir=Path("/data"), **kwargs)


def test_rtm_uses_python_round_and_minimum() -> None:
    assert rtm(100) == 128 and rtm(95) == 64 and rtm(96) == 128  # 1.5 → 2 (banker's: even)
    assert rtm(160) == 128  # 2.5 → 2
    assert rtm(10) == 64 and rtm(0) == 64


@pytest.mark.parametrize(
    ("size", "target", "key"),
    [
        ((750, 1000), (896, 1152), "0.78"),
        ((1500, 1000), (1280, 832), "1.54"),
        ((1780, 1000), (1344, 768), "1.75"),
        ((1000, 1000), (1024, 1024), "1.0"),
    ],
)
def test_pixel_area_1024_examples(size, target, key) -> None:
    geometry = BucketPlanner().plan(_config(resolution=1024, resolution_type="pixel_area"), size)
    assert geometry.target_size == target and geometry.bucket == key
    iw, ih = geometry.intermediary_size
    assert iw >= target[0] and ih >= target[1]  # enlarged, never smaller than the target
    assert abs(iw / ih - size[0] / size[1]) < 0.01  # keeps the original aspect
    left, top, right, bottom = geometry.crop_box
    assert (right - left, bottom - top) == target


def test_area_mode_same_as_pixel_area() -> None:
    area = BucketPlanner().plan(_config(resolution=1.048576, resolution_type="area"), (750, 1000))
    assert area.target_size == (896, 1152) and area.bucket == "0.78"


def test_aspect_is_rounded_before_formulas() -> None:
    # 1777/1000 = 1.777 → 1.78 → same bucket as 1.78 exactly
    a = BucketPlanner().plan(_config(), (1777, 1000))
    b = BucketPlanner().plan(_config(), (1780, 1000))
    assert a.target_size == b.target_size == (1344, 768)


def test_first_size_per_key_is_remembered_per_resolution() -> None:
    memory = ResolutionMemory()
    # ar 1.29 → 1152x896 (key 1.29); seed the memory with a different size for that key
    memory.set(1.048576, 1.29, (1216, 960))
    target, inter, key = size_by_pixel_area(1.29, 1.048576, (1290, 1000), memory)
    assert key == 1.29 and target == (1216, 960)
    # SimpleTuner enlarges only along the side that fell short first (W here), keeping the aspect:
    # 896·1.29 → 1155 wide, +61 → 1216, height +int(61/1.29) = 943 (the crop box is then clipped)
    assert inter == (1216, 943)
    # another resolution has its own memory
    target, _, _ = size_by_pixel_area(1.29, 0.262144, (1290, 1000), memory)
    assert target == (576, 448)
    # first computed wins: planner stores the first and reuses it
    planner = BucketPlanner()
    first = planner.plan(_config(), (1300, 1000))
    assert planner.memory.get(1.048576, float(first.bucket)) == first.target_size


def test_pixel_mode() -> None:
    # W < H: W' = 512, H' = int(512 / 0.75) = 682 → rtm 704
    target, inter, key = size_by_pixel_edge(0.75, 512, (750, 1000))
    assert target == (512, 704) and key == 0.73 and inter == (528, 704)
    # landscape: H' = 512, W' = int(512 * 1.5) = 768
    target, inter, key = size_by_pixel_edge(1.5, 512, (1500, 1000))
    assert target == (768, 512) and inter == (768, 512) and key == 1.5
    geometry = BucketPlanner().plan(_config(resolution=512, resolution_type="pixel"), (1500, 1000))
    assert geometry.bucket == "1.5" and geometry.crop_box == (0, 0, 768, 512)


def test_square_crop_with_downsample_seed_000() -> None:
    config = _config(
        crop=True,
        crop_aspect="square",
        crop_style="center",
        resolution=1024,
        resolution_type="pixel_area",
        maximum_image_size=1024,
        target_downsample_size=1024,
    )
    planner = BucketPlanner()
    geometry = planner.plan(config, (3000, 2000))
    assert geometry.bucket == "1.0" and geometry.target_size == (1024, 1024)
    assert geometry.downsample_size == (1536, 1024)  # original aspect at ~1 MP, covering 1024x1024
    assert geometry.intermediary_size == (1536, 1024)
    assert geometry.crop_box == (256, 0, 1280, 1024)
    portrait = planner.plan(config, (2000, 3000))
    assert portrait.crop_box == (0, 256, 1024, 1280)


def test_square_crop_without_downsample_and_crop_false() -> None:
    config = _config(crop=True, crop_aspect="square", crop_style="center", resolution=512, resolution_type="pixel")
    geometry = BucketPlanner().plan(config, (1000, 750))
    assert geometry.bucket == "1.0" and geometry.target_size == (512, 512)
    assert geometry.downsample_size is None
    assert geometry.intermediary_size == (682, 512)
    assert geometry.crop_box == (85, 0, 597, 512)
    # crop: false keeps the aspect bucket (crop_aspect is ignored) and still crops to the bucket size
    loose = BucketPlanner().plan(_config(crop=False, crop_aspect="square"), (750, 1000))
    assert loose.bucket == "0.78" and loose.target_size == (896, 1152)


def test_preserve_aspect_crop() -> None:
    config = _config(crop=True, crop_aspect="preserve", crop_style="center")
    geometry = BucketPlanner().plan(config, (1500, 1000))
    assert geometry.bucket == "1.54" and geometry.target_size == (1280, 832)


def test_random_crop_is_deterministic_per_content_and_seed() -> None:
    a = crop_box((1000, 600), (512, 512), "random", content_hash="abc", seed=1)
    assert a == crop_box((1000, 600), (512, 512), "random", content_hash="abc", seed=1)
    boxes = {crop_box((1000, 600), (512, 512), "random", content_hash=f"h{i}", seed=1) for i in range(20)}
    assert len(boxes) > 5
    for left, top, right, bottom in boxes:
        assert 0 <= left <= 488 and 0 <= top <= 88 and right - left == 512 and bottom - top == 512
    assert crop_box((512, 512), (512, 512), "random", content_hash="x") == (0, 0, 512, 512)


def test_center_crop_formula() -> None:
    assert crop_box((1367, 768), (1344, 768), "center") == (11, 0, 1355, 768)
    # source smaller than the target on one side: the box is clipped (then resized to target)
    assert crop_box((500, 800), (512, 512), "center") == (0, 144, 500, 656)


def test_minimum_size_units() -> None:
    pixel = _config(resolution=512, resolution_type="pixel", minimum_image_size=512)
    assert minimum_size_reason(pixel, (512, 600)) is None
    assert "511x600" in minimum_size_reason(pixel, (511, 600))
    area = _config(resolution=1024, resolution_type="pixel_area", minimum_image_size=1024)
    assert minimum_size_reason(area, (2048, 512)) is None  # area 1.048576 MP passes
    assert minimum_size_reason(area, (1000, 1000)) is not None
    square = _config(minimum_image_size=1024, crop=True, crop_aspect="square")
    assert "1024px" in minimum_size_reason(square, (2048, 512))  # square crop needs both edges
    assert minimum_size_reason(_config(minimum_image_size=0), (10, 10)) is None


def test_repeats_needed() -> None:
    assert repeats_needed(3, 8) == 2  # 3 × 3 = 9 ≥ 8
    assert repeats_needed(1, 4) == 3
    assert repeats_needed(8, 8) == 0

"""Aspect bucketing exactly as SimpleTuner does it (DESIGN.md §6).

Users move LoRAs and datasets between SimpleTuner and stagetune; if a picture lands in a different
bucket or gets a different crop, the same config trains on different pixels. So these functions follow
SimpleTuner's `MultiaspectImage.calculate_new_size_by_pixel_edge/_by_pixel_area` and
`TrainingSample.calculate_target_size/_calculate_target_downsample_size/crop` (helpers/multiaspect/image.py,
helpers/image_manipulation/training_sample.py, cropping.py), including their quirks: the aspect is rounded
to two decimals before any formula, and the first size computed for a bucket key is remembered per
resolution and reused for every later image with that key.

The one deliberate difference: `crop_style: random` draws its offsets from the sample's content hash and a
seed, so the same image always gets the same crop and the latent cache stays valid across runs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import xxhash

from stagetune.core.config.dataset import DatasetConfig

ALIGNMENT = 64

Size = tuple[int, int]


def rtm(value: float, multiple: int = ALIGNMENT) -> int:
    """Round to the nearest multiple (Python's banker's `round`), never below one multiple."""
    return max(round(value / multiple) * multiple, multiple)


def aspect_ratio(size: Size | list[int]) -> float:
    width, height = size
    return round(width / height, 2)


def bucket_key(ratio: float) -> str:
    """The string form used in manifests and reports: "1.0", "0.78", "1.54"."""
    return str(float(ratio))


@dataclass
class ResolutionMemory:
    """SimpleTuner's `StateTracker.{get,set}_resolution_by_aspect`: the first size seen per bucket key.

    Shared by every dataset of one ingest run (as SimpleTuner shares it across its data backends), keyed by
    the resolution in megapixels, so two 1024px datasets bucket a 0.78 image to the same size.
    """

    sizes: dict[tuple[float, float], Size] = field(default_factory=dict)

    def get(self, resolution: float, key: float) -> Size | None:
        return self.sizes.get((float(resolution), float(key)))

    def set(self, resolution: float, key: float, size: Size) -> None:
        self.sizes.setdefault((float(resolution), float(key)), size)


def size_by_pixel_edge(ratio: float, resolution: int, original_size: Size) -> tuple[Size, Size, float]:
    """`pixel` mode: the shorter side becomes `resolution` (target from the rounded aspect)."""
    width, height = original_size
    raw_ratio = width / height
    if width < height:
        w_target = resolution
        h_target = int(w_target / ratio)
    else:
        h_target = resolution
        w_target = int(h_target * ratio)
    w_adjusted, h_adjusted = rtm(w_target), rtm(h_target)
    if raw_ratio >= 1.0:
        h_initial = max(h_adjusted, h_target)
        w_initial = int(h_initial * raw_ratio)
        if w_initial < w_adjusted:
            w_initial = w_adjusted
            h_initial = int(w_initial / raw_ratio)
    else:
        w_initial = max(w_adjusted, w_target)
        h_initial = int(w_initial / raw_ratio)
        if h_initial < h_adjusted:
            h_initial = h_adjusted
            w_initial = int(h_initial * raw_ratio)
    return (w_adjusted, h_adjusted), (w_initial, h_initial), aspect_ratio((w_adjusted, h_adjusted))


def size_by_pixel_area(
    ratio: float, megapixels: float, original_size: Size, memory: ResolutionMemory
) -> tuple[Size, Size, float]:
    """`area` / `pixel_area` mode: target area `megapixels`, shape from the rounded aspect."""
    edge = rtm(int(math.sqrt(megapixels * 1e6)))
    width, height = original_size
    if ratio == 1.0 and width == height:
        return (edge, edge), (edge, edge), ratio
    w_target = rtm(edge * math.sqrt(ratio))
    h_target = rtm(edge / math.sqrt(ratio))
    raw_ratio = width / height
    if w_target < h_target:
        w_inter = w_target
        h_inter = int(w_inter / raw_ratio)
    else:
        h_inter = h_target
        w_inter = int(h_inter * raw_ratio)
    key = aspect_ratio((w_target, h_target))
    remembered = memory.get(megapixels, key)
    if remembered:
        w_target, h_target = remembered
    if w_target > w_inter or h_target > h_inter:
        if w_target > w_inter:
            w_diff = w_target - w_inter
            h_diff = int(w_diff / raw_ratio)
        else:
            h_diff = h_target - h_inter
            w_diff = int(h_diff * raw_ratio)
        h_inter += h_diff
        w_inter += w_diff
    if not remembered:
        memory.set(megapixels, key, (w_target, h_target))
    return (w_target, h_target), (w_inter, h_inter), key


def area_target_pixels(megapixels: float) -> float:
    """SimpleTuner's `_set_resolution` snaps common megapixel values to the matching square areas."""
    for mp, area in ((0.25, 512**2), (0.5, 768**2), (1.0, 1024**2), (2.0, 1536**2), (4.0, 2048**2)):
        if abs(megapixels - mp) < 0.05:
            return float(area)
    return megapixels * 1e6


@dataclass(frozen=True)
class Geometry:
    """Everything that decides the pixels fed to the VAE for one image."""

    bucket: str
    target_size: Size
    intermediary_size: Size
    crop_box: tuple[int, int, int, int]
    downsample_size: Size | None = None


def crop_box(
    source_size: Size, target_size: Size, style: str, *, content_hash: str = "", seed: int = 0
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in `source_size` coordinates, as SimpleTuner's cropping.py."""
    src_w, src_h = source_size
    tgt_w, tgt_h = target_size
    if style == "random":
        max_left = max(0, src_w - tgt_w)
        max_top = max(0, src_h - tgt_h)
        rng = random.Random(xxhash.xxh3_64_intdigest(f"{seed}:{content_hash}".encode()))
        left = rng.randint(0, max_left) if max_left > 0 else 0
        top = rng.randint(0, max_top) if max_top > 0 else 0
    else:  # center / centre
        left = max(0, int((src_w - tgt_w) / 2))
        top = max(0, int((src_h - tgt_h) / 2))
    right = left + min(tgt_w, src_w - left)
    bottom = top + min(tgt_h, src_h - top)
    return left, top, right, bottom


class BucketPlanner:
    """Computes each image's geometry; one instance per ingest run so the size memory is shared."""

    def __init__(self, memory: ResolutionMemory | None = None) -> None:
        self.memory = memory or ResolutionMemory()

    def _calculate(self, config: DatasetConfig, ratio: float, resolution: float, original: Size):
        if config.bucket_mode == "pixel":
            return size_by_pixel_edge(ratio, int(resolution), original)
        return size_by_pixel_area(ratio, resolution, original, self.memory)

    @staticmethod
    def pixel_resolution(config: DatasetConfig) -> int:
        if config.bucket_mode == "pixel":
            return int(config.bucket_resolution)
        return int(rtm(math.sqrt(area_target_pixels(config.bucket_resolution))))

    def _should_downsample(self, config: DatasetConfig, original: Size, target: Size) -> bool:
        """`TrainingSample._should_resize_before_crop`: crop + maximum_image_size + target_downsample_size."""
        if (
            not config.crop
            or not config.bucket_maximum_image_size
            or not config.bucket_target_downsample_size
        ):
            return False
        width, height = original
        if config.bucket_mode == "pixel":
            edge = self.pixel_resolution(config)
            return width != edge or height != edge
        area = width * height
        target_area = area_target_pixels(config.bucket_resolution)
        return area != target_area or width < target[0] or height < target[1]

    def _downsample_size(self, config: DatasetConfig, original: Size, target: Size) -> Size:
        """`_calculate_target_downsample_size`: original aspect at target_downsample_size, covering target."""
        resolution = config.bucket_target_downsample_size
        assert resolution is not None
        _, size, _ = self._calculate(config, aspect_ratio(original), resolution, original)
        if size[0] < target[0]:
            scale = target[0] / size[0]
            size = (target[0], int(size[1] * scale))
        elif size[1] < target[1]:
            scale = target[1] / size[1]
            size = (int(size[0] * scale), target[1])
        return int(size[0]), int(size[1])

    def plan(
        self, config: DatasetConfig, original: Size, *, content_hash: str = "", seed: int = 0
    ) -> Geometry:
        original = (int(original[0]), int(original[1]))
        resolution = config.bucket_resolution
        edge = self.pixel_resolution(config)
        if config.crop and config.crop_aspect == "square":
            target: Size = (edge, edge)
            _, intermediary, _ = self._calculate(config, 1.0, resolution, original)
            ratio = 1.0
        else:
            target, intermediary, _ = self._calculate(config, aspect_ratio(original), resolution, original)
            ratio = aspect_ratio(target)
        if ratio == 1.0 and intermediary[0] < edge:  # correct_intermediary_square_size
            intermediary = (edge, edge)
        if ratio == 1.0:
            target = (edge, edge)
        intermediary = (int(intermediary[0]), int(intermediary[1]))

        downsample: Size | None = None
        crop_source = intermediary
        if config.crop and self._should_downsample(config, original, target):
            # SimpleTuner then crops straight from the downsampled picture: it is the crop's source.
            downsample = self._downsample_size(config, original, target)
            crop_source = downsample
        box = crop_box(crop_source, target, config.crop_style, content_hash=content_hash, seed=seed)
        return Geometry(
            bucket=bucket_key(ratio),
            target_size=target,
            intermediary_size=crop_source,
            crop_box=box,
            downsample_size=downsample,
        )


def minimum_size_reason(config: DatasetConfig, original: Size) -> str | None:
    """Why an image is below `minimum_image_size` (SimpleTuner's `meets_resolution_requirements`), or None."""
    minimum = config.bucket_minimum_image_size
    if not minimum:
        return None
    width, height = original
    if config.bucket_mode == "pixel":
        if minimum <= width and minimum <= height:
            return None
        return f"smaller than minimum_image_size: {width}x{height}, both edges must be ≥ {minimum:g}px"
    pixels = minimum * 1e6
    if config.crop and config.crop_aspect == "square":
        edge = math.floor(math.sqrt(pixels))
        if not (edge <= width and edge <= height):
            return (
                f"smaller than minimum_image_size: {width}x{height}, "
                f"a square crop needs both edges ≥ {edge}px"
            )
    if pixels <= width * height:
        return None
    return (
        f"smaller than minimum_image_size: {width}x{height} = {width * height / 1e6:.3f} MP "
        f"< {minimum:.3f} MP"
    )


def aspect_limit_reason(config: DatasetConfig, bucket: str) -> str | None:
    """`minimum_aspect_ratio` / `maximum_aspect_ratio` act on the bucket key, as SimpleTuner."""
    value = float(bucket)
    if config.minimum_aspect_ratio and value < config.minimum_aspect_ratio:
        return f"bucket {bucket} below minimum_aspect_ratio {config.minimum_aspect_ratio:g}"
    if config.maximum_aspect_ratio and value > config.maximum_aspect_ratio:
        return f"bucket {bucket} above maximum_aspect_ratio {config.maximum_aspect_ratio:g}"
    return None


def repeats_needed(samples: int, effective_batch_size: int) -> int:
    """Smallest `repeats` with samples × (repeats + 1) ≥ effective batch (SimpleTuner's message)."""
    return max(0, math.ceil(effective_batch_size / samples) - 1)


__all__ = [
    "ALIGNMENT",
    "BucketPlanner",
    "Geometry",
    "ResolutionMemory",
    "aspect_limit_reason",
    "aspect_ratio",
    "bucket_key",
    "crop_box",
    "minimum_size_reason",
    "repeats_needed",
    "rtm",
    "size_by_pixel_area",
    "size_by_pixel_edge",
]

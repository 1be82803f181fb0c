"""Aspect bucketing exactly as SimpleTuner does it (DESIGN.md §6).

Users move LoRAs and datasets between SimpleTuner and stagetune; if a picture lands in a different
bucket or gets a different crop, the same config trains on different pixels. So these functions follow
SimpleTuner's `MultiaspectImage.calculate_new_size_by_pixel_edge/_by_pixel_area` and
`TrainingSample.calculate_target_size/_calculate_target_downsample_size/crop` (helpers/multiaspect/image.py,
helpers/image_manipulation/training_sample.py, cropping.py), including their quirks: the aspect is rounded
to two decimals before any formula, and the first size computed for a bucket key is remembered per
resolution and reused for every later image with that key.

The one deliberate difference: what SimpleTuner draws at random (`crop_style: random` offsets and the
`crop_aspect: random` bucket) is drawn here from the sample's content hash and a seed, so the same image
always gets the same crop and bucket and the latent cache stays valid across runs. SimpleTuner also draws
the aspect once, at metadata discovery, and keeps it in its bucket cache.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from stagetune.core.config.dataset import DatasetConfig
from stagetune.core.crops import crop_box, seeded_rng

ALIGNMENT = 64

Size = tuple[int, int]
T = TypeVar("T")


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


class BucketPlanner:
    """Computes each image's geometry; one instance per ingest run so the size memory is shared."""

    def __init__(self, memory: ResolutionMemory | None = None) -> None:
        self.memory = memory or ResolutionMemory()
        #: How many images `crop_aspect: random` put in the square bucket because no listed aspect stayed
        #: within `max_upscale_threshold` (SimpleTuner's "Using square crop." warning), per dataset id.
        self.upscale_fallbacks: dict[str, int] = {}

    def _aspects_within_upscale(self, config: DatasetConfig, original: Size) -> list[float]:
        """`TrainingSample._trim_aspect_bucket_list`: aspects whose target needs ≤ threshold upscaling.

        A target edge may be at most `original edge × (1 + threshold)`, checked on both edges.
        """
        aspects = [aspect for aspect, _ in config.crop_aspect_buckets]
        threshold = config.max_upscale_threshold
        if threshold is None:
            return aspects
        allowed = []
        for aspect in aspects:
            target, _, _ = self._calculate(config, aspect, config.bucket_resolution, original)
            if target[0] <= original[0] * (1 + threshold) and target[1] <= original[1] * (1 + threshold):
                allowed.append(aspect)
        return allowed

    def select_aspect(self, config: DatasetConfig, original: Size, *, content_hash: str = "", seed: int = 0) -> float:
        """`TrainingSample._select_random_aspect` for `crop_aspect` closest / random.

        closest: the listed aspect nearest the image's rounded aspect (the first one on a tie, as `min`).
        random with weights: a weighted draw (`random.choices`); with a plain list: a uniform draw among the
        aspects within `max_upscale_threshold`, or 1.0 when none is. SimpleTuner applies the threshold only in
        that last case; the run report warns when it is set where it has no effect.
        """
        buckets = config.crop_aspect_buckets
        if config.crop_aspect == "closest":
            ratio = aspect_ratio(original)
            return min((aspect for aspect, _ in buckets), key=lambda aspect: abs(aspect - ratio))
        rng = seeded_rng("crop_aspect:", content_hash, seed)
        if buckets and buckets[0][1] is not None:
            return rng.choices([a for a, _ in buckets], weights=[w or 0.0 for _, w in buckets])[0]
        available = self._aspects_within_upscale(config, original)
        if not available:
            self.upscale_fallbacks[config.id] = self.upscale_fallbacks.get(config.id, 0) + 1
            return 1.0
        return rng.choice(available)

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
        elif config.crop and config.crop_aspect in ("closest", "random"):
            chosen = float(self.select_aspect(config, original, content_hash=content_hash, seed=seed))
            target, intermediary, _ = self._calculate(config, chosen, resolution, original)
            ratio = aspect_ratio(target)
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


def shuffle_bucket(samples: Sequence[T], *, seed: int, dataset_id: str, bucket: str) -> list[T]:
    """SimpleTuner's pre-split shuffle: sort by `str`, then `random.Random(f"{seed}:{id}:{bucket}").shuffle`.

    Every rank computes the same order from the same inputs, so no rank needs to broadcast it.
    """
    ordered = sorted(samples, key=str)
    random.Random(f"{seed}:{dataset_id}:{bucket}").shuffle(ordered)
    return ordered


def split_for_rank(
    samples: Sequence[T], rank: int, world_size: int, effective_batch: int, *, pad: bool = False
) -> list[T]:
    """This rank's share of one bucket, a whole number of per-rank batches, the same number on every rank.

    As SimpleTuner's `split_buckets_between_processes`: contiguous slices, the first `len % world_size`
    ranks one sample longer; with `pad` (SimpleTuner's `apply_padding`, used when training by epochs or with
    oversubscription) the shorter ranks repeat the bucket's last sample so all slices are equally long.
    Then each slice is cut to a multiple of `effective_batch // world_size` (train_batch_size ×
    gradient_accumulation_steps): SimpleTuner's sampler leaves a bucket once fewer than a batch remain, and
    a rank that drew one batch more than the others would wait forever in the next collective.
    `samples` must be in the same order on every rank (see `shuffle_bucket`).
    """
    for name, value in (("world_size", world_size), ("effective_batch", effective_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number ≥ 1, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank!r}")
    if effective_batch % world_size:
        raise ValueError(f"effective_batch {effective_batch} is not a multiple of world_size {world_size}")
    items = list(samples)
    per_rank_batch = effective_batch // world_size
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    mine = items[start : start + base + int(rank < extra)]
    longest = base + int(extra > 0)
    if pad and items and len(mine) < longest:
        mine += [items[-1]] * (longest - len(mine))
    # Every rank must stop at the same batch count: the shortest slice decides it.
    shortest = longest if pad else base
    keep = (shortest // per_rank_batch) * per_rank_batch
    return mine[:keep]


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
    "shuffle_bucket",
    "split_for_rank",
    "size_by_pixel_area",
    "size_by_pixel_edge",
]

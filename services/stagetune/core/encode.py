"""The shared shape of a caching stage: find what is missing, encode it in batches, write shards.

Both encoder services (latents, text embeddings) are this loop with a different encoder, so a cache
hit costs one index lookup and a second run over the same data encodes nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from stagetune.core import metrics
from stagetune.core.cache import ShardedCache

Item = TypeVar("Item")


@dataclasses.dataclass
class EncodeStats:
    total: int = 0
    hits: int = 0
    encoded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # loading the encoder, only when something had to be encoded

    def as_outputs(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}


def encode_missing(
    *,
    stage: str,
    items: Sequence[Item],
    key_of: Callable[[Item], str],
    cache: ShardedCache,
    batches: Callable[[list[Item]], Iterable[list[Item]]],
    encode: Callable[[list[Item]], list[dict[str, torch.Tensor]]],
    write_batch_size: int,
    progress: Callable[[int, int], None] = lambda done, total: None,
    load: Callable[[], object] = lambda: None,
) -> EncodeStats:
    """Encode the items whose key is not in `cache` yet; each distinct key is encoded once."""
    started = time.perf_counter()
    cache.refresh()
    unique: dict[str, Item] = {}
    for item in items:
        unique.setdefault(key_of(item), item)
    missing_keys = set(cache.missing(unique))
    todo = [item for key, item in unique.items() if key in missing_keys]
    stats = EncodeStats(total=len(unique), hits=len(unique) - len(todo))
    metrics.CACHE_HITS.labels(stage).inc(stats.hits)
    progress(stats.hits, stats.total)
    if todo:
        load_started = time.perf_counter()
        load()
        stats.load_seconds = time.perf_counter() - load_started
    with cache.writer(write_batch_size) as writer:
        for batch in batches(todo):
            batch_started = time.perf_counter()
            with torch.inference_mode():
                outputs = encode(batch)
            for item, tensors in zip(batch, outputs, strict=True):
                writer.add(key_of(item), tensors)
            stats.encoded += len(batch)
            metrics.ITEMS_ENCODED.labels(stage).inc(len(batch))
            metrics.BATCH_SECONDS.labels(stage).observe(time.perf_counter() - batch_started)
            progress(stats.hits + stats.encoded, stats.total)
    stats.bytes_written = writer.stats.bytes_written
    metrics.CACHE_BYTES.labels(stage).inc(stats.bytes_written)
    stats.seconds = time.perf_counter() - started
    return stats


def chunks(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start : start + size])

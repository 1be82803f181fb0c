"""Caches filled during training instead of before it (SimpleTuner's `*_cache_ondemand` / `*_cache_disable`).

With `vae_cache_ondemand` the encoder stages only compute keys (`cached_only`) and the trainer reads
through an `OnDemandCache`: a hit comes from the shared cache, a miss is encoded in the trainer's
process and written back (ondemand) or used once and dropped (disable), so a huge dataset starts
training at once. Entries are encoded one at a time, so a value never depends on its batch: a
resumed run computes exactly what the killed one did.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from stagetune.core import metrics
from stagetune.core.cache import CacheWriter, ShardedCache
from stagetune.core.encode import EncodeStats

Item = TypeVar("Item")


def cached_only(*, stage: str, items: Iterable[Item], key_of: Callable[[Item], str], cache: ShardedCache
                ) -> EncodeStats:
    """Count what the cache already has, encode nothing (the trainer will)."""
    cache.refresh()
    keys = list(dict.fromkeys(key_of(item) for item in items))
    missing = len(cache.missing(keys))
    stats = EncodeStats(total=len(keys), hits=len(keys) - missing)
    metrics.CACHE_HITS.labels(stage).inc(stats.hits)
    return stats


class OnDemandCache:
    """Reads like a `ShardedCache`; computes what is missing with `compute(key)`."""

    def __init__(self, cache: ShardedCache, compute: Callable[[str], dict[str, torch.Tensor]], *, stage: str,
                 write: bool, write_batch_size: int = 128) -> None:
        self.cache = cache
        self.compute = compute
        self.stage = stage
        self.write = write
        self._writer: CacheWriter | None = cache.writer(write_batch_size) if write else None
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # written but maybe not flushed yet
        self._lock = threading.Lock()
        self.encoded = 0

    def refresh(self) -> None:
        self.cache.refresh()

    def has(self, key: str) -> bool:
        return key in self._pending or self.cache.has(key)

    def get(self, key: str) -> dict[str, torch.Tensor]:
        with self._lock:
            if key in self._pending:
                return {k: v.clone() for k, v in self._pending[key].items()}
            if self.cache.has(key):
                return self.cache.get(key)
            with torch.inference_mode():
                tensors = {k: v.clone() for k, v in self.compute(key).items()}
            self.encoded += 1
            metrics.ITEMS_ENCODED.labels(self.stage).inc()
            if self._writer is not None:
                self._writer.add(key, tensors)
                self._pending[key] = tensors
            return {k: v.clone() for k, v in tensors.items()}

    def flush(self) -> None:
        """Make what was encoded so far visible to other jobs (called at checkpoints and at the end)."""
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
                self.cache.refresh()
                self._pending = {k: v for k, v in self._pending.items() if not self.cache.has(k)}

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()


def inverse(mapping: dict[Any, str]) -> dict[str, Any]:
    """key -> item from item -> key (the key maps the encoder stages write)."""
    return {key: item for item, key in mapping.items()}

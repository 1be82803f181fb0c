"""Bucketed batch order: every batch holds samples of one aspect bucket.

The order of an epoch is a pure function of (seed, epoch), so the sampler's whole state is two
integers (epoch, batches already taken). That is what makes kill-and-resume give the same weights
bit for bit: the resumed run rebuilds the epoch's order and skips what was done.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """One training sample after repeats: which manifest row and which copy of it."""

    row: int
    repeat: int
    bucket: str


@dataclasses.dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already yielded in this epoch


def expand_repeats(rows: Sequence[Any]) -> list[SampleRef]:
    """SimpleTuner's `repeats`: 0 means each sample once, N means N extra copies."""
    refs = []
    for index, row in enumerate(rows):
        for copy in range(int(row.repeats or 0) + 1):
            refs.append(SampleRef(index, copy, str(row.bucket)))
    return refs


class BucketBatchSampler:
    def __init__(self, samples: Sequence[SampleRef], batch_size: int, seed: int) -> None:
        self.samples = list(samples)
        self.batch_size = batch_size
        self.seed = seed
        self.state = SamplerState()
        by_bucket: dict[str, list[SampleRef]] = defaultdict(list)
        for ref in self.samples:
            by_bucket[ref.bucket].append(ref)
        self._buckets = {k: by_bucket[k] for k in sorted(by_bucket)}
        self._epoch_batches: tuple[int, list[list[SampleRef]]] | None = None

    def batches_for_epoch(self, epoch: int) -> list[list[SampleRef]]:
        if self._epoch_batches is not None and self._epoch_batches[0] == epoch:
            return self._epoch_batches[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches: list[list[SampleRef]] = []
        for members in self._buckets.values():
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            whole = len(shuffled) // self.batch_size * self.batch_size  # incomplete batches are dropped
            batches.extend(shuffled[i : i + self.batch_size] for i in range(0, whole, self.batch_size))
        order = torch.randperm(len(batches), generator=generator).tolist()
        self._epoch_batches = (epoch, [batches[i] for i in order])
        return self._epoch_batches[1]

    def __len__(self) -> int:
        """Batches per epoch."""
        return sum(len(m) // self.batch_size for m in self._buckets.values())

    def next_batch(self) -> tuple[list[SampleRef], int]:
        """The next batch and the epoch it belongs to; epochs roll over by themselves."""
        if len(self) == 0:
            raise ValueError("no complete batch: every bucket is smaller than the batch size")
        batches = self.batches_for_epoch(self.state.epoch)
        if self.state.position >= len(batches):
            self.state = SamplerState(self.state.epoch + 1, 0)
            batches = self.batches_for_epoch(self.state.epoch)
        batch = batches[self.state.position]
        self.state.position += 1
        return batch, self.state.epoch

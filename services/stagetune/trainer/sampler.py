"""Batch order: every batch holds samples of one aspect bucket of one dataset.

Datasets are mixed as SimpleTuner does it: before each micro-batch, one dataset is drawn with
weights = `probability` among those that are active (`start_step` ≤ next step ≤ `end_step`) and
not yet exhausted this epoch; the epoch ends when none is left. Each dataset batches with its own
`train_batch_size`.

An epoch's whole schedule is a pure function of (seed, epoch, micro-batches before the epoch), so
the sampler's state is three integers. That is what makes kill-and-resume give the same weights
bit for bit: the resumed run rebuilds the epoch's schedule and skips what was done.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from stagetune.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SampleRef:
    """One training sample after repeats: which manifest row and which copy of it."""

    row: int
    repeat: int
    bucket: str
    dataset_id: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetPlan:
    """How one dataset takes part in training (its multidatabackend.json sampling keys)."""

    dataset_id: str
    batch_size: int
    probability: float = 1.0
    start_step: int = 0
    end_step: int | None = None
    regularisation: bool = False

    def active(self, next_step: int) -> bool:
        return next_step >= self.start_step and (self.end_step is None or next_step <= self.end_step)


@dataclasses.dataclass(frozen=True)
class Batch:
    plan: DatasetPlan
    samples: tuple[SampleRef, ...]


@dataclasses.dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # batches already yielded in this epoch
    epoch_start: int = 0  # micro-batches yielded before this epoch began


def expand_repeats(rows: Sequence[Any]) -> list[SampleRef]:
    """SimpleTuner's `repeats`: 0 means each sample once, N means N extra copies."""
    refs = []
    for index, row in enumerate(rows):
        for copy in range(int(row.repeats or 0) + 1):
            refs.append(SampleRef(index, copy, str(row.bucket), str(getattr(row, "dataset_id", ""))))
    return refs


class BucketBatchSampler:
    """One dataset's batches for an epoch: shuffled within buckets, incomplete batches dropped."""

    def __init__(self, samples: Sequence[SampleRef], batch_size: int, seed: int, salt: int = 0) -> None:
        self.samples = list(samples)
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        by_bucket: dict[str, list[SampleRef]] = defaultdict(list)
        for ref in self.samples:
            by_bucket[ref.bucket].append(ref)
        self._buckets = {k: by_bucket[k] for k in sorted(by_bucket)}
        self._epoch_batches: tuple[int, list[list[SampleRef]]] | None = None

    def batches_for_epoch(self, epoch: int) -> list[list[SampleRef]]:
        if self._epoch_batches is not None and self._epoch_batches[0] == epoch:
            return self._epoch_batches[1]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + self.salt * 7_919)
        batches: list[list[SampleRef]] = []
        for members in self._buckets.values():
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            whole = len(shuffled) // self.batch_size * self.batch_size
            batches.extend(shuffled[i : i + self.batch_size] for i in range(0, whole, self.batch_size))
        order = torch.randperm(len(batches), generator=generator).tolist()
        self._epoch_batches = (epoch, [batches[i] for i in order])
        return self._epoch_batches[1]

    def __len__(self) -> int:
        """Batches per epoch."""
        return sum(len(m) // self.batch_size for m in self._buckets.values())


class TrainingSampler:
    """Mixes the datasets' batches into one schedule per epoch (see the module docstring)."""

    def __init__(self, samples: Sequence[SampleRef], plans: Mapping[str, DatasetPlan], seed: int,
                 gradient_accumulation_steps: int = 1) -> None:
        self.seed = seed
        self.grad_accum = max(1, gradient_accumulation_steps)
        by_dataset: dict[str, list[SampleRef]] = defaultdict(list)
        for ref in samples:
            by_dataset[ref.dataset_id].append(ref)
        missing = sorted(set(by_dataset) - set(plans))
        if missing:
            raise ConfigError(f"no sampling plan for dataset(s) {missing}", field="data_backend_config")
        self.plans = {d: plans[d] for d in sorted(by_dataset)}
        self.samplers = {
            d: BucketBatchSampler(by_dataset[d], self.plans[d].batch_size, seed, salt=i)
            for i, d in enumerate(self.plans)
        }
        self.state = SamplerState()
        self._schedule: tuple[tuple[int, int], list[Batch]] | None = None

    def schedule(self, epoch: int, epoch_start: int) -> list[Batch]:
        if self._schedule is not None and self._schedule[0] == (epoch, epoch_start):
            return self._schedule[1]
        batches = {d: s.batches_for_epoch(epoch) for d, s in self.samplers.items()}
        taken = dict.fromkeys(batches, 0)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 104_729)
        out: list[Batch] = []
        micro = epoch_start
        while True:
            next_step = micro // self.grad_accum + 1
            candidates = [d for d, plan in self.plans.items()
                          if taken[d] < len(batches[d]) and plan.active(next_step) and plan.probability > 0]
            if not candidates:
                break
            if len(candidates) == 1:
                chosen = candidates[0]
            else:
                weights = torch.tensor([self.plans[d].probability for d in candidates], dtype=torch.float64)
                chosen = candidates[int(torch.multinomial(weights / weights.sum(), 1, generator=generator))]
            out.append(Batch(self.plans[chosen], tuple(batches[chosen][taken[chosen]])))
            taken[chosen] += 1
            micro += 1
        self._schedule = ((epoch, epoch_start), out)
        return out

    def __len__(self) -> int:
        """Batches in the first epoch (what `num_train_epochs` counts)."""
        return len(self.schedule(0, 0))

    def next_batch(self) -> tuple[Batch, int]:
        """The next batch and its epoch; epochs roll over by themselves."""
        schedule = self.schedule(self.state.epoch, self.state.epoch_start)
        if self.state.position >= len(schedule):
            if not schedule:
                raise ConfigError(
                    f"no dataset can give a batch at epoch {self.state.epoch}: check train_batch_size, "
                    "repeats, start_step and end_step", field="data_backend_config")
            self.state = SamplerState(self.state.epoch + 1, 0, self.state.epoch_start + len(schedule))
            return self.next_batch()
        batch = schedule[self.state.position]
        self.state.position += 1
        return batch, self.state.epoch


def plans_for(rows: Sequence[Any], report: Mapping[str, Any], default_batch_size: int) -> dict[str, DatasetPlan]:
    """Each dataset's plan from the ingest report's per-dataset `sampling` keys (defaults: SimpleTuner's)."""
    datasets = report.get("datasets", {}) if isinstance(report, Mapping) else {}
    plans = {}
    for dataset_id in sorted({str(getattr(row, "dataset_id", "")) for row in rows}):
        entry = datasets.get(dataset_id, {}) if isinstance(datasets, Mapping) else {}
        sampling = entry.get("sampling", {}) if isinstance(entry, Mapping) else {}
        probability = sampling.get("probability")
        end_step = sampling.get("end_step")
        plans[dataset_id] = DatasetPlan(
            dataset_id=dataset_id,
            batch_size=int(sampling.get("train_batch_size") or default_batch_size),
            probability=1.0 if probability is None else float(probability),
            start_step=int(sampling.get("start_step") or 0),
            end_step=None if end_step in (None, "", 0) else int(end_step),
            regularisation=bool(sampling.get("is_regularisation_data")),
        )
    return plans

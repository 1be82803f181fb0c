"""Micro-batches assembled ahead of the step, and each sample's random draws from its own seed.

Every random choice about a sample (which of its captions, caption dropout, its noise, noise offset, σ)
comes from a generator seeded by (seed, epoch, row, repeat): the sample's draws do not depend on what
else is in its batch, on how many processes share the work, or on whether the run was resumed.

That is also what lets the next batches be read on a background thread while the transformer runs:
reading cache entries and choosing captions move no shared random state. The thread only reads (no torch
compute: a thread's first parallel op would start OpenMP workers of its own, core/encode.py); the main
thread stacks and draws noise. On-demand caches encode on a miss, which is torch compute, so with them the
batches are read in the main thread. The time the step waits for its batch is measured.
"""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import xxhash

from stagetune.trainer.sampler import Batch, SampleRef, SamplerState, TrainingSampler


def sample_seed(seed: int, epoch: int, ref: SampleRef) -> int:
    return xxhash.xxh3_64_intdigest(f"{seed}:{epoch}:{ref.row}:{ref.repeat}".encode()) & ((1 << 63) - 1)


@dataclasses.dataclass
class Fetched:
    """One micro-batch read from the caches, with the sampler's position after it."""

    batch: Batch
    epoch: int
    seeds: list[int]
    latents: list[dict[str, torch.Tensor]]
    texts: list[dict[str, torch.Tensor]]
    empty: list[bool]  # the caption is empty (data or dropout)
    state_after: SamplerState


Reader = Callable[[int, int], dict[str, torch.Tensor]]  # (row, epoch) → latent entry


def fetch(sampler: TrainingSampler, rows: Any, latent_entry: Reader, text_entry: Callable[[str], dict],
          seed: int, dropout: float, share: Callable[[list], list] = list) -> Fetched:
    """The sampler's next micro-batch, read: captions chosen from each sample's own seed. `share` picks this
    process's part of a global batch (trainer/distributed.py); a sample's seed is the same on any rank."""
    batch, epoch = sampler.next_batch()
    samples = share(list(batch.samples))
    seeds = [sample_seed(seed, epoch, ref) for ref in samples]
    latents, texts, empty = [], [], []
    for ref, sample in zip(samples, seeds, strict=True):
        choose = random.Random(sample)
        captions = rows[ref.row].captions or [""]
        caption = captions[choose.randrange(len(captions))] if len(captions) > 1 else captions[0]
        if choose.random() < dropout:
            caption = ""
        latents.append(latent_entry(ref.row, epoch))
        texts.append(text_entry(caption))
        empty.append(caption == "")
    return Fetched(batch, epoch, seeds, latents, texts, empty, dataclasses.replace(sampler.state))


class BatchSource:
    """`next()` gives micro-batches in the sampler's order, read `ahead` batches early on a thread."""

    def __init__(self, read_next: Callable[[], Fetched], *, ahead: int = 2, threaded: bool = True) -> None:
        self._read_next = read_next
        self.threaded = threaded and ahead > 0
        self.wait_seconds = 0.0  # time `next` waited for a batch since the last `take_wait`
        self._queue: queue.Queue[Fetched | BaseException] = queue.Queue(maxsize=max(1, ahead))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.threaded:
            self._thread = threading.Thread(target=self._fill, name="trainer-batches", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item: Fetched | BaseException = self._read_next()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
                item = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> Fetched:
        started = time.perf_counter()
        if not self.threaded:
            item: Fetched | BaseException = self._read_next()
        else:
            item = self._queue.get()
        self.wait_seconds += time.perf_counter() - started
        if isinstance(item, BaseException):
            raise item
        return item

    def take_wait(self) -> float:
        waited, self.wait_seconds = self.wait_seconds, 0.0
        return waited

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while True:  # unblock a filler waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)

"""The prepare-ahead pipeline of the caching stages: same entries as the plain loop, torch left alone."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from stagetune.core.cache import ShardedCache
from stagetune.core.encode import encode_missing, helper_threads
from stagetune.core.store.local import LocalStore


def test_helper_threads_leave_torch_alone(tmp_path: Path) -> None:
    """Helpers never change torch's thread count: it leaks into threads started later (the trainer's)."""
    before = torch.get_num_threads()
    cache = ShardedCache(LocalStore(tmp_path), "cache/threads")
    encode_missing(stage="threads", items=[f"k{i}" for i in range(9)], key_of=lambda item: item, cache=cache,
                   batches=lambda todo: [todo[i : i + 2] for i in range(0, len(todo), 2)],
                   prepare=lambda batch: [len(item) for item in batch],
                   encode=lambda batch, sizes: [{"n": torch.tensor([float(n)])} for n in sizes], write_batch_size=4)
    with helper_threads(1, "later") as pool:
        assert pool.submit(torch.get_num_threads).result() == before
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("with_prepare", [False, True])
def test_prepared_ahead_encodes_the_same_entries(tmp_path: Path, with_prepare: bool) -> None:
    """`prepare` runs ahead in another thread; every batch still reaches `encode` with its own input."""
    items = [f"item-{i:02d}" for i in range(23)]
    prepared_in: set[str] = set()

    def prepare(batch: list[str]) -> torch.Tensor:
        prepared_in.add(threading.current_thread().name)
        return torch.tensor([float(item[-2:]) for item in batch])

    def encode(batch: list[str], values: torch.Tensor | None = None) -> list[dict[str, torch.Tensor]]:
        if values is None:
            values = prepare(batch)
        assert values.tolist() == [float(item[-2:]) for item in batch]
        return [{"value": v.reshape(1) * 2} for v in values]

    cache = ShardedCache(LocalStore(tmp_path), "cache/test")
    stats = encode_missing(
        stage="test", items=items, key_of=lambda item: item, cache=cache,
        batches=lambda todo: [todo[i : i + 3] for i in range(0, len(todo), 3)],
        encode=encode, write_batch_size=5, prepare=prepare if with_prepare else None,
    )
    assert stats.encoded == 23
    cache.refresh()
    assert all(cache.get(item)["value"].item() == 2 * float(item[-2:]) for item in items)
    if with_prepare:
        assert prepared_in and all(name.startswith("test-prepare") for name in prepared_in)


def test_compute_threads_sets_this_threads_count_and_puts_it_back() -> None:
    from stagetune.core.encode import PROCESS_THREADS, compute_threads
    from stagetune.vae.service import READ_WORKERS, encoder_threads

    before = torch.get_num_threads()
    with compute_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with compute_threads():
        assert torch.get_num_threads() == PROCESS_THREADS
    assert encoder_threads(torch.device("cpu")) == max(1, PROCESS_THREADS - READ_WORKERS)
    assert encoder_threads(torch.device("meta")) == PROCESS_THREADS  # not a CPU: no decoding to make room for

"""Caching stages may change torch's thread count while they run (`CoreBalance`): that must change speed only.

These tests pin the assumption the balance rests on (encoders give the same bits at 1 and 2 threads on
this CPU) and the balance's own rules, and that the prepare-ahead pipeline encodes exactly what the plain
loop does.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from stagetune.core.cache import ShardedCache
from stagetune.core.encode import CoreBalance, encode_missing, helper_threads
from stagetune.core.store.local import LocalStore
from stagetune.models.sd3.text import SD3TextEncoder
from stagetune.models.sd3.vae import SD3LatentEncoder


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_encoders_give_the_same_bits_at_one_and_two_threads(tiny_sd3_path: Path) -> None:
    vae = SD3LatentEncoder.from_pretrained(str(tiny_sd3_path))
    text = SD3TextEncoder.from_pretrained(str(tiny_sd3_path))
    pixels = torch.rand(4, 3, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = ["a red square", "two blue circles on grey", ""]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append((vae.encode(pixels, [1, 2, 3, 4]), text.encode(captions, t5_max_length=77)))
    (latents_1, text_1), (latents_2, text_2) = results
    assert torch.equal(latents_1, latents_2)
    assert all(torch.equal(text_1[name], text_2[name]) for name in text_1)


def test_balance_gives_a_core_back_only_when_the_encoder_waits() -> None:
    torch.set_num_threads(2)
    balance = CoreBalance()
    for _ in range(CoreBalance.MIN_BATCHES):
        balance.observe(waited=0.01, busy=0.1)  # 9 % waiting: the encoder is the bottleneck
    assert torch.get_num_threads() == 2
    for _ in range(CoreBalance.MIN_BATCHES):
        balance.observe(waited=0.05, busy=0.1)  # 33 % waiting: inputs are the bottleneck
    assert torch.get_num_threads() == 1
    for _ in range(CoreBalance.MIN_BATCHES):
        balance.observe(waited=0.5, busy=0.1)
    assert torch.get_num_threads() == 1  # never below one
    balance.restore()
    assert torch.get_num_threads() == 2


def test_helper_threads_run_torch_on_one_thread() -> None:
    torch.set_num_threads(2)
    with helper_threads(1, "test-helper") as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
    assert torch.get_num_threads() == 2


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

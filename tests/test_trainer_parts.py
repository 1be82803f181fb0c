"""Flow-matching maths, the bucket sampler and checkpoint files, without a model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stagetune.core.errors import NotFoundError
from stagetune.core.store.local import LocalStore
from stagetune.trainer import checkpoint
from stagetune.trainer.flow import FlowSchedule, noisy_input, sample_sigmas, timesteps_for
from stagetune.trainer.sampler import BucketBatchSampler, SamplerState, expand_repeats


def test_static_shift_matches_the_formula() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    raw = sample_sigmas(FlowSchedule(shift=1.0), 1000, 64, g1)
    shifted = sample_sigmas(FlowSchedule(shift=3.0), 1000, 64, g2)
    assert torch.allclose(shifted, 3 * raw / (1 + 2 * raw), atol=1e-6)
    assert 0 < float(raw.min()) and float(raw.max()) < 1
    # logit-normal with scale 1: the median of sigmoid(N(0,1)) is 0.5
    assert abs(float(raw.median()) - 0.5) < 0.05


def test_auto_shift_grows_with_sequence_length() -> None:
    schedule = FlowSchedule(auto_shift=True)
    assert schedule.shift_for(256) == pytest.approx(math.exp(0.5))
    assert schedule.shift_for(4096) == pytest.approx(math.exp(1.15))
    assert schedule.shift_for(1024) > schedule.shift_for(256)


def test_uniform_and_beta_schedules_have_their_moments() -> None:
    g = torch.Generator().manual_seed(0)
    uniform = sample_sigmas(FlowSchedule(shift=1.0, use_uniform=True), 20000, 16, g)
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.005
    beta = sample_sigmas(FlowSchedule(shift=1.0, use_beta=True, beta_alpha=2.0, beta_beta=5.0), 20000, 16, g)
    assert abs(float(beta.mean()) - 2 / 7) < 0.01


def test_noisy_input_and_target() -> None:
    x = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)
    sigmas = torch.tensor([0.0, 1.0])
    noisy, target = noisy_input(x, noise, sigmas)
    assert torch.equal(noisy[0], x[0]) and torch.equal(noisy[1], noise[1])
    assert torch.equal(target, noise - x)
    assert torch.equal(timesteps_for(torch.tensor([0.25])), torch.tensor([250.0]))


def _rows(buckets: dict[str, int], repeats: int = 0) -> list[SimpleNamespace]:
    return [SimpleNamespace(bucket=b, repeats=repeats) for b, n in buckets.items() for _ in range(n)]


def test_batches_hold_one_bucket_and_drop_remainders() -> None:
    rows = _rows({"1.0": 5, "0.78": 4})
    sampler = BucketBatchSampler(expand_repeats(rows), batch_size=2, seed=1)
    batches = sampler.batches_for_epoch(0)
    assert len(batches) == len(sampler) == 4  # 5 // 2 + 4 // 2
    for batch in batches:
        assert len({ref.bucket for ref in batch}) == 1
    assert batches == BucketBatchSampler(expand_repeats(rows), 2, seed=1).batches_for_epoch(0)
    assert batches != sampler.batches_for_epoch(1)


def test_repeats_zero_is_once_and_n_adds_copies() -> None:
    assert len(expand_repeats(_rows({"1.0": 3}, repeats=0))) == 3
    assert len(expand_repeats(_rows({"1.0": 3}, repeats=2))) == 9


def test_sampler_resumes_from_its_state() -> None:
    rows = expand_repeats(_rows({"1.0": 6, "1.5": 4}))
    straight = BucketBatchSampler(rows, 2, seed=7)
    order = [straight.next_batch() for _ in range(12)]  # crosses an epoch boundary (5 per epoch)
    resumed = BucketBatchSampler(rows, 2, seed=7)
    for _ in range(7):
        resumed.next_batch()
    state = SamplerState(**vars(resumed.state))
    fresh = BucketBatchSampler(rows, 2, seed=7)
    fresh.state = state
    assert [fresh.next_batch() for _ in range(5)] == order[7:]


def test_checkpoints_are_complete_or_ignored(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    checkpoint.save_checkpoint(store, 10, {"a.bin": b"1234"}, {"sampler": {}})
    checkpoint.save_checkpoint(store, 20, {"a.bin": b"5678"}, {"sampler": {}})
    # A checkpoint killed before its state file: ignored.
    store.put_bytes("checkpoint-30/a.bin", b"partial")
    # A checkpoint whose file was truncated: ignored.
    checkpoint.save_checkpoint(store, 40, {"a.bin": b"abcdef"}, {"sampler": {}})
    store.put_bytes("checkpoint-40/a.bin", b"abc")
    assert checkpoint.list_checkpoints(store) == [10, 20]
    assert checkpoint.resolve_resume(store, "latest") == (store, 20)
    files, state = checkpoint.load_checkpoint(store, 20)
    assert files == {"a.bin": b"5678"} and state["step"] == 20
    with pytest.raises(NotFoundError, match="checkpoint-30"):
        checkpoint.load_checkpoint(store, 30)
    assert checkpoint.resolve_resume(store, None) is None
    path_store, step = checkpoint.resolve_resume(store, str(tmp_path / "checkpoint-10"))
    assert step == 10 and path_store.get_bytes("checkpoint-10/a.bin") == b"1234"


def test_total_limit_removes_the_oldest(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for step in (5, 10, 15):
        checkpoint.save_checkpoint(store, step, {"w": b"x" * step}, {}, total_limit=2)
    assert checkpoint.list_checkpoints(store) == [10, 15]
    assert not list(store.list("checkpoint-5/"))

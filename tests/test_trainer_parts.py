"""Flow-matching maths, the bucket sampler and checkpoint files, without a model."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stagetune.core import checkpoints as checkpoint
from stagetune.core.errors import ConfigError, NotFoundError
from stagetune.core.store.local import LocalStore
from stagetune.trainer.flow import FlowSchedule, noisy_input, sample_sigmas, timesteps_for
from stagetune.trainer.sampler import (
    BucketBatchSampler,
    DatasetPlan,
    SamplerState,
    TrainingSampler,
    expand_repeats,
    plans_for,
)


def _generators(n: int, offset: int = 0) -> list[torch.Generator]:
    """One generator per sample, as the trainer gives each (seed, epoch, row, repeat)."""
    return [torch.Generator().manual_seed(offset * 1_000_003 + i) for i in range(n)]


def test_one_sample_draws_the_same_sigma_in_any_batch() -> None:
    alone = sample_sigmas(FlowSchedule(shift=3.0), [torch.Generator().manual_seed(42)], 64)
    batch = sample_sigmas(FlowSchedule(shift=3.0), [*_generators(5), torch.Generator().manual_seed(42)], 64)
    assert torch.equal(alone[0], batch[-1])


def test_static_shift_matches_the_formula() -> None:
    raw = sample_sigmas(FlowSchedule(shift=1.0), _generators(1000), 64)
    shifted = sample_sigmas(FlowSchedule(shift=3.0), _generators(1000), 64)
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
    uniform = sample_sigmas(FlowSchedule(shift=1.0, use_uniform=True), _generators(20000), 16)
    assert abs(float(uniform.mean()) - 0.5) < 0.01 and abs(float(uniform.var()) - 1 / 12) < 0.005
    beta_schedule = FlowSchedule(shift=1.0, use_beta=True, beta_alpha=2.0, beta_beta=5.0)
    beta = sample_sigmas(beta_schedule, _generators(20000, 7), 16)
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


def _mixed(buckets: dict[str, dict[str, int]]) -> list[SimpleNamespace]:
    """Rows of several datasets: {dataset: {bucket: count}}."""
    return [SimpleNamespace(bucket=b, repeats=0, dataset_id=d)
            for d, per in buckets.items() for b, n in per.items() for _ in range(n)]


def _plans(**kwargs: DatasetPlan) -> dict[str, DatasetPlan]:
    return dict(kwargs)


def test_sampler_resumes_from_its_state() -> None:
    rows = expand_repeats(_mixed({"a": {"1.0": 6, "1.5": 4}, "b": {"1.0": 4}}))
    plans = _plans(a=DatasetPlan("a", 2), b=DatasetPlan("b", 1, probability=2.0))
    straight = TrainingSampler(rows, plans, seed=7)
    order = [straight.next_batch() for _ in range(25)]  # crosses epoch boundaries (9 per epoch)
    resumed = TrainingSampler(rows, plans, seed=7)
    for _ in range(12):
        resumed.next_batch()
    fresh = TrainingSampler(rows, plans, seed=7)
    fresh.state = SamplerState(**vars(resumed.state))
    assert [fresh.next_batch() for _ in range(13)] == order[12:]


def test_datasets_mix_by_probability_with_their_own_batch_size() -> None:
    rows = expand_repeats(_mixed({"a": {"1.0": 40}, "b": {"1.0": 40}}))
    plans = _plans(a=DatasetPlan("a", 2, probability=1.0), b=DatasetPlan("b", 1, probability=3.0))
    firsts = [TrainingSampler(rows, plans, seed=s).schedule(0, 0)[0].plan.dataset_id for s in range(400)]
    assert 0.68 < firsts.count("b") / len(firsts) < 0.82  # 3/4 expected
    schedule = TrainingSampler(rows, plans, seed=1).schedule(0, 0)
    assert {len(b.samples) for b in schedule if b.plan.dataset_id == "a"} == {2}
    assert {len(b.samples) for b in schedule if b.plan.dataset_id == "b"} == {1}
    assert len(schedule) == 20 + 40  # every dataset is exhausted before the epoch ends


def test_start_and_end_step_gate_a_dataset() -> None:
    rows = expand_repeats(_mixed({"a": {"1.0": 40}, "b": {"1.0": 40}}))
    plans = _plans(a=DatasetPlan("a", 1), b=DatasetPlan("b", 1, start_step=5, end_step=9))
    schedule = TrainingSampler(rows, plans, seed=3, gradient_accumulation_steps=2).schedule(0, 0)
    steps_with_b = {i // 2 + 1 for i, b in enumerate(schedule) if b.plan.dataset_id == "b"}
    assert steps_with_b and min(steps_with_b) >= 5 and max(steps_with_b) <= 9
    never = _plans(a=DatasetPlan("a", 1, probability=0.0), b=DatasetPlan("b", 1, probability=0.0))
    with pytest.raises(ConfigError, match="no dataset can give a batch"):
        TrainingSampler(rows, never, seed=0).next_batch()


def test_plans_come_from_the_ingest_report() -> None:
    rows = _mixed({"a": {"1.0": 2}, "reg": {"1.0": 2}})
    report = {"datasets": {"reg": {"sampling": {"probability": 0.5, "train_batch_size": 3, "start_step": 2,
                                                "end_step": None, "is_regularisation_data": True}}}}
    plans = plans_for(rows, report, default_batch_size=4)
    assert plans["a"] == DatasetPlan("a", 4)
    assert plans["reg"] == DatasetPlan("reg", 3, probability=0.5, start_step=2, regularisation=True)
    report["datasets"]["reg"]["sampling"]["vae_cache_clear_each_epoch"] = True  # the trainer's latents, not the plan
    assert plans_for(rows, report, default_batch_size=4) == plans


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


def test_bf16_default_is_refused_on_a_gpu_without_it_and_said_on_an_emulating_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from stagetune.core.errors import PreconditionError
    from stagetune.trainer.loop import check_bf16

    said: list[str] = []
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    check_bf16(torch.device("cpu"), "bf16", said.append)
    assert len(said) == 1 and "mixed_precision=bf16" in said[0] and "emulated" in said[0]
    check_bf16(torch.device("cpu"), "no", said.append)
    assert len(said) == 1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(PreconditionError, match="Tesla V100 has no bfloat16; set mixed_precision") as info:
        check_bf16(torch.device("cuda"), "bf16", said.append)
    assert info.value.field == "mixed_precision"

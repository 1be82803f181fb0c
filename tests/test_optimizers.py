"""SimpleTuner's optimizers and learning-rate schedules, by name, with its defaults and maths."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from stagetune.core.config.optimizer_names import SUPPORTED, parse_optimizer_config
from stagetune.core.config.train import load_train_config
from stagetune.core.errors import ConfigError
from stagetune.trainer.adamw_bf16 import AdamWBF16
from stagetune.trainer.optimizers import OPTIMIZERS, build_optimizer, settings_for
from stagetune.trainer.schedules import build_scheduler

BASE = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 10}


def config(**values: Any) -> Any:
    return load_train_config({**BASE, **values})


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 80)).to(dtype)


def _train(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int = 1) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    losses = []
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 96, generator=generator).to(dtype)
        loss = (model(x).float() ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


#: A rate each optimizer learns this small problem with (adaptive ones take SimpleTuner's usual 1.0).
LEARNING_RATES = {"prodigy": 1.0, "torch-adadelta": 1.0, "torch-sgd": 0.1, "optimi-sgd": 0.1, "torch-asgd": 0.1,
                  "torch-adagrad": 1e-2, "bnb-adagrad": 1e-2, "bnb-adagrad8bit": 1e-2}


def test_every_supported_name_has_a_spec() -> None:
    assert set(SUPPORTED) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_trains_and_resumes_bit_for_bit(name: str) -> None:
    cfg = config(optimizer=name, learning_rate=LEARNING_RATES.get(name, 1e-3))
    dtype = torch.bfloat16 if OPTIMIZERS[name].bf16_weights else torch.float32
    model = _model(dtype)
    optimizer = build_optimizer(name, model.parameters(), cfg)
    if OPTIMIZERS[name].schedule_free:
        optimizer.train()
    losses = _train(optimizer, model, 6)
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[3:]) < losses[0], (name, losses)  # it minimises the loss

    # resume: the same optimizer state and RNG, the same next steps, bit for bit
    torch.manual_seed(5)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state())
    straight = _train(optimizer, model, 3, seed=9)
    after_straight = {k: v.clone() for k, v in model.state_dict().items()}
    again = _model(dtype)
    again.load_state_dict(saved[0])
    resumed_optimizer = build_optimizer(name, again.parameters(), cfg)
    resumed_optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    assert _train(resumed_optimizer, again, 3, seed=9) == straight
    for key, value in again.state_dict().items():
        assert torch.equal(value, after_straight[key]), (name, key)


def test_settings_follow_simpletuners_order() -> None:
    assert settings_for("optimi-adamw", config(optimizer="optimi-adamw")) == {
        "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0, "decouple_lr": False, "kahan_sum": True,
        "max_lr": None}
    betas = settings_for("torch-adamw", config(optimizer="adamw", optimizer_beta1=0.8, optimizer_beta2=0.95))
    assert betas["betas"] == (0.8, 0.95)
    both = config(optimizer="adamw", optimizer_beta1=0.8, optimizer_beta2=0.95, optimizer_config="eps=1e-5")
    assert settings_for("torch-adamw", both)["betas"] == (0.9, 0.999)  # optimizer_config wins, as SimpleTuner
    assert settings_for("torch-adamw", both)["eps"] == 1e-5
    legacy = settings_for("torch-adamw", config(optimizer="adamw", adam_beta1=0.7, adam_weight_decay=0.0))
    assert legacy["betas"] == (0.7, 0.999) and legacy["weight_decay"] == 0.0
    assert settings_for("prodigy", config(optimizer="prodigy", prodigy_steps=50))["prodigy_steps"] == 50
    assert "lr" not in settings_for("prodigy", config(optimizer="prodigy"))


def test_optimizer_config_values_are_read_as_simpletuner_reads_them() -> None:
    assert parse_optimizer_config("eps=1e-6, weight_decay=0.0,use_x=true,d0=none,name=foo,steps=3") == {
        "eps": 1e-6, "weight_decay": 0.0, "use_x": True, "d0": None, "name": "foo", "steps": 3}
    with pytest.raises(ConfigError, match="is not key=value"):
        config(optimizer_config="eps")


def test_settings_an_optimizer_does_not_take_are_dropped_with_a_warning() -> None:
    said: list[str] = []
    build_optimizer("torch-sgd", _model().parameters(), config(optimizer="torch-sgd", optimizer_config="eps=0.1"),
                    warn=said.append)
    assert said == ["optimizer=torch-sgd does not take eps: dropped, as SimpleTuner does"]


def test_old_adafactor_name_and_unknown_names() -> None:
    legacy = config(optimizer="adafactor")
    assert legacy.optimizer == "torch-adafactor" and any("adafactor" in w for w in legacy.warnings)
    with pytest.raises(ConfigError, match="did you mean 'optimi-lion'"):
        config(optimizer="optimi-loin")


# ------------------------------------------------------------------------------------------------ adamw_bf16


def test_adamw_bf16_trains_bfloat16_weights_only() -> None:
    model = _model()
    with pytest.raises(TypeError, match="bfloat16"):
        _train(AdamWBF16(model.parameters(), lr=1e-3), model, 1)


def test_adamw_bf16_first_moment_and_small_updates() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    optimizer = AdamWBF16([weight], lr=1e-4, weight_decay=0.0)
    grad = torch.full_like(weight, 0.5)
    weight.grad = grad.clone()
    optimizer.step()
    # SimpleTuner's update: m1 = g + (1 - beta1)·beta1·m0 = g (the textbook gives 0.1·g)
    assert torch.equal(optimizer.state[weight]["exp_avg"], grad)
    for _ in range(99):
        weight.grad = grad.clone()
        optimizer.step()
    # 100 updates of ~1e-4 on a weight of 1.0 (bf16 spacing 2**-7): plain bf16 AdamW never moves it;
    # the compensated, stochastically rounded updates move it by about the full 0.01
    moved = 1.0 - float(weight.float().mean())
    assert 0.007 < moved < 0.013, moved
    plain = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    adamw = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    for _ in range(100):
        plain.grad = grad.clone()
        adamw.step()
    assert torch.equal(plain, torch.ones_like(plain))


# ------------------------------------------------------------------------------------------------ schedules


def _rates(name: str, steps: int = 12, **values: Any) -> list[float]:
    cfg = config(lr_scheduler=name, learning_rate=1.0, **values)
    optimizer = torch.optim.SGD(_model().parameters(), lr=cfg.learning_rate)
    scheduler = build_scheduler(cfg, optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_constant_and_warmup_as_diffusers() -> None:
    assert _rates("constant") == [1.0] * 12
    assert _rates("constant_with_warmup", lr_warmup_steps=4)[:6] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    linear = _rates("linear", lr_warmup_steps=2)
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[-1] == pytest.approx(0.1)


def test_simpletuners_cosine_and_sine_waves() -> None:
    cosine = _rates("cosine", lr_warmup_steps=4, lr_end=0.0)
    expected = [math.floor((1 + math.cos(math.pi * s / 4)) / 2 * 1e9) / 1e9 for s in range(12)]
    assert cosine == expected and cosine[4] == 0.0 and cosine[8] == 1.0
    sine = _rates("sine", lr_warmup_steps=6, lr_end=0.2)
    assert sine == [math.floor((0.2 + 0.8 * 0.5 * (1 + math.sin(math.pi * s / 6))) * 1e9) / 1e9 for s in range(12)]
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        _rates("sine")


def test_polynomial_decays_to_lr_end() -> None:
    rates = _rates("polynomial", steps=10, lr_warmup_steps=2, lr_end=0.1, lr_power=2.0)
    assert rates[:3] == [0.0, 0.5, pytest.approx(1.0)]
    assert rates[6] == pytest.approx((1 - 0.1) * (1 - 4 / 8) ** 2 + 0.1)
    with pytest.raises(ConfigError, match="lr_end"):
        _rates("polynomial", lr_end=2.0)


def test_cosine_with_restarts_restarts_lr_num_cycles_times() -> None:
    rates = _rates("cosine_with_restarts", steps=12, lr_num_cycles=3)
    assert rates[0] == 1.0 and rates[4] == pytest.approx(1.0) and rates[8] == pytest.approx(1.0)
    assert rates[3] < 0.5 and rates[7] < 0.5

"""Learning-rate schedules under SimpleTuner's names, with its maths.

- `constant`, `constant_with_warmup`, `linear`: diffusers' schedules (SimpleTuner's generic path). Note that
  diffusers' warmup starts at 0: the first step of a warmup trains at learning rate 0.
- `polynomial`: warmup, then (lr - lr_end)·(1 - progress)^lr_power + lr_end (SimpleTuner's own).
- `cosine`: SimpleTuner's: a cosine wave between learning_rate and lr_end with a half-period of
  `lr_warmup_steps` steps (1000 when that is 0), no warmup, the rate truncated to 1e-9.
- `sine`: SimpleTuner's: lr_end + (lr - lr_end)·(1 + sin(π·step / lr_warmup_steps))/2.
- `cosine_with_restarts`: diffusers' cosine with `lr_num_cycles` hard restarts after warmup. SimpleTuner's
  own version keeps the rate constant (it warns that it "may not do what you expect"); stagetune gives the
  schedule the name describes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from stagetune.core.errors import ConfigError

#: SimpleTuner's half-period for `cosine` when lr_warmup_steps is 0.
COSINE_DEFAULT_PERIOD = 1000


class _Wave(LRScheduler):
    """SimpleTuner's `cosine` and `sine`: lr(step) from a wave, truncated to 1e-9 as SimpleTuner does."""

    def __init__(self, optimizer: torch.optim.Optimizer, shape: Callable[[int], float], lr_end: float) -> None:
        self._shape = shape
        self.lr_end = lr_end
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        step = max(self.last_epoch, 0)
        return [math.floor((self.lr_end + (base - self.lr_end) * self._shape(step)) * 1e9) / 1e9
                for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_shape")}


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    name, warmup = cfg.lr_scheduler, int(cfg.lr_warmup_steps)
    if name == "cosine":
        period = warmup if warmup > 0 else COSINE_DEFAULT_PERIOD
        return _Wave(optimizer, lambda step: (1 + math.cos(math.pi * step / period)) / 2, cfg.lr_end)
    if name == "sine":
        if warmup <= 0:
            raise ConfigError("lr_scheduler=sine takes its period from lr_warmup_steps: set it above 0",
                              field="lr_warmup_steps")
        return _Wave(optimizer, lambda step: 0.5 * (1 + math.sin(math.pi * step / warmup)), cfg.lr_end)
    if name == "polynomial":
        return _polynomial(optimizer, warmup, total_steps, cfg.lr_end, cfg.lr_power)
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)


def _polynomial(optimizer: torch.optim.Optimizer, warmup: int, total: int, lr_end: float, power: float) -> LambdaLR:
    lr_init = float(optimizer.defaults["lr"])
    if not lr_init > lr_end:
        raise ConfigError(f"lr_scheduler=polynomial decays to lr_end={lr_end}, which must be below "
                          f"learning_rate={lr_init}", field="lr_end")

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if step > total:
            return lr_end / lr_init
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init

    return LambdaLR(optimizer, factor)

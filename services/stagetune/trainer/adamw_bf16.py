"""`adamw_bf16`, SimpleTuner's default optimizer: AdamW for bfloat16 weights, with SimpleTuner's maths.

bf16 has 8 bits of mantissa: a small update added to a weight rounds away. This optimizer keeps the part
of each update that did not land (`shift`, one extra bf16 tensor per weight, compensated summation),
rounds stochastically (an update smaller than half an ulp still lands with the right probability), and
applies weight decay in lumps once enough of it has accumulated. As SimpleTuner's version: the step has
no first-moment bias correction (only `sqrt(1 - beta2^t)`), the first moment is updated as noted in
`_update`, its default `eps` is 1e-6, and the random bits come from torch's global generator, which
every checkpoint saves (so resume is bit-identical).
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import Optimizer

#: Weight decay is applied once it adds up to this much (each weight starts at a random point below it).
DECAY_THRESHOLD = 5e-3


def _round_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write float32 `value` into bf16 `target`, rounding each element up or down at random in proportion
    to the dropped low bits (stochastic rounding)."""
    bits = torch.randint_like(value, low=0, high=1 << 16, dtype=torch.int32)
    bits.add_(value.view(torch.int32))
    bits.bitwise_and_(-65536)  # keep sign, exponent and the top 7 mantissa bits
    target.copy_(bits.view(torch.float32))


def _add_rounded(target: torch.Tensor, other: torch.Tensor) -> None:
    _round_into(target, target.to(torch.float32).add(other.to(torch.float32)))


def _addcdiv_rounded(target: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor, value: float) -> None:
    result = target.to(torch.float32).addcdiv(numerator, denominator, value=value)
    _round_into(target, result)


class AdamWBF16(Optimizer):
    def __init__(self, params: object, *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 1e-2) -> None:
        if eps < 0:
            raise ValueError(f"invalid eps: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # noqa: ARG002 - the signature torch expects
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.dtype != torch.bfloat16:
                    raise TypeError("adamw_bf16 trains bfloat16 weights only")
                state = self.state[param]
                if not state:
                    state["step"] = 0.0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    state["shift"] = torch.zeros_like(param)  # what should have been added to the weight
                    state["accumulated_decay"] = float(torch.rand([]) * DECAY_THRESHOLD)
                state["step"] += 1
                lr = group["lr"]
                state["accumulated_decay"] += group["weight_decay"] * lr
                decay = state["accumulated_decay"] if state["accumulated_decay"] > DECAY_THRESHOLD else 0.0
                state["accumulated_decay"] -= decay
                self._update(param, param.grad, state, beta1, beta2, lr, group["eps"], decay)

    @staticmethod
    def _update(param: torch.Tensor, grad: torch.Tensor, state: dict, beta1: float, beta2: float, lr: float,
                eps: float, decay: float) -> None:
        exp_avg, exp_avg_sq, shift = state["exp_avg"], state["exp_avg_sq"], state["shift"]
        # SimpleTuner's update of the first moment is grad + (1 - beta1)·(beta1·m), not the textbook
        # beta1·m + (1 - beta1)·grad: its helper adds `alpha × target` to `other`. Kept, so that the
        # learning rates users tuned on SimpleTuner's default optimizer give the same steps here.
        exp_avg.mul_(beta1)
        _round_into(exp_avg, grad.to(torch.float32).add(exp_avg.to(torch.float32), alpha=1 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction = (1 - beta2 ** state["step"]) ** 0.5
        _addcdiv_rounded(shift, exp_avg, exp_avg_sq.sqrt().add_(eps), value=-lr * correction)
        before = param.clone()
        _add_rounded(param, shift)
        _add_rounded(shift, before.sub_(param))  # keep what did not land in the weight
        if decay > 0:
            shift.add_(param, alpha=-decay)

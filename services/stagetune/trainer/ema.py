"""Exponential moving average of the trained weights (SimpleTuner's `use_ema` and its `ema_*` keys).

diffusers' `EMAModel` keeps the shadow copy: `ema_decay` with its warm-up (decay ≤ (1 + k) / (10 + k)),
updated every `ema_update_interval` optimizer steps once `ema_warmup_steps` have passed, on the CPU unless
`ema_device: accelerator` (and `ema_cpu_only` is off). Its state is part of every checkpoint, so a resumed
run averages exactly as one that never stopped.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import Any

import torch

EMA_FILE = "ema.pt"
#: Where the averaged adapter goes in output_dir, beside the trained one (as SimpleTuner's ema/ folder).
EMA_FOLDER = "ema"


class Ema:
    def __init__(self, params: Sequence[torch.nn.Parameter], cfg: Any, device: torch.device) -> None:
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.interval = max(1, int(cfg.ema_update_interval or 1))
        on_device = cfg.ema_device == "accelerator" and not cfg.ema_cpu_only
        self.device = device if on_device else torch.device("cpu")
        from torch.distributed.tensor import DTensor

        # FSDP-sharded weights (DTensors) have no sharding rule for the foreach kernels: one tensor at a time
        sharded = any(isinstance(p, DTensor) for p in self.params)
        self.model = EMAModel(self.params, decay=cfg.ema_decay, update_after_step=int(cfg.ema_warmup_steps or 0),
                              foreach=not (cfg.ema_foreach_disable or sharded))
        self.model.to(self.device)

    def step(self, global_step: int) -> None:
        if global_step % self.interval == 0:
            self.model.step(self.params)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block (to save or validate them), then the trained ones."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state_bytes(self) -> bytes:
        """Whole tensors, also when FSDP shards the weights (gathering them is a collective every rank joins)."""
        state = self.model.state_dict()
        state["shadow_params"] = [_whole(p) for p in state["shadow_params"]]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def load_bytes(self, data: bytes) -> None:
        state = torch.load(io.BytesIO(data), weights_only=True)
        # sharded weights: each rank keeps its shard of the same whole tensors (no communication)
        state["shadow_params"] = [_like(whole, param) for whole, param in zip(state["shadow_params"], self.params,
                                                                               strict=True)]
        self.model.load_state_dict(state)
        self.model.to(self.device)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _like(whole: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return whole
    return distribute_tensor(whole.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)

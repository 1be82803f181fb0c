"""Data-parallel training across processes and machines: who this process is, and what ranks agree on.

The same variables torchrun sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) describe a
worker, so a cluster's launcher can start workers directly and `stagetune train` starts them itself.

What N processes at batch b guarantee against 1 process at batch N·b (README): each optimizer step takes one
global batch of N·b samples from the sampler, in the same order; rank r trains samples [r·b, (r+1)·b); every
sample's noise, σ and caption dropout come from its own seed, never from a per-process stream; gradients are
averaged across ranks before clipping and the optimizer step. So the weights equal the single-process run's
up to float rounding of the sums (the reduction order differs), on any number of ranks.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

#: How long ranks wait for each other (rendezvous, a collective) before failing instead of hanging.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def device(self) -> torch.device:
        """Where collectives' small tensors live: NCCL reduces GPU tensors only."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @classmethod
    def from_env(cls) -> World:
        """torchrun's variables; one process when they are absent."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))

    def start(self) -> None:
        """Join the process group (gloo on CPU, NCCL on CUDA), once per process."""
        if not self.distributed or torch.distributed.is_initialized():
            return
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=TIMEOUT)

    def stop(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def slice(self, items: list) -> list:
        """This rank's share of one global batch: contiguous, equal parts."""
        if not self.distributed:
            return items
        per_rank, rest = divmod(len(items), self.size)
        if rest:
            raise ValueError(f"a global batch of {len(items)} does not split over {self.size} processes")
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank's gradients replaced by their mean (what DDP computes), one flat all-reduce per dtype."""
        if not self.distributed:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            flat /= self.size
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor)
        return float(tensor[0]) / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says so: a stop (cancel, SIGTERM) happens at the same step."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor[0])


def free_port(host: str = "127.0.0.1") -> int:
    """A port for a one-machine rendezvous that no other run is using."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


# -- FSDP2 (fsdp_enable): a full-rank model sharded over the ranks ---------------------------------------------
#
# Checkpoints and outputs stay whole files that any tool loads: the shards are gathered on rank 0 when they are
# written (a collective: every rank takes part) and spread again on resume from the same whole files.


def shard_model(model: torch.nn.Module, *, reshard_after_forward: bool = True, cpu_offload: bool = False) -> None:
    """FSDP2 over the model's own block classes (diffusers' `_no_split_modules`: SD3's JointTransformerBlock,
    Sana's SanaTransformerBlock), then the root, so one block's weights are gathered at a time."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    fully_shard(model, reshard_after_forward=reshard_after_forward, offload_policy=policy)


def _whole() -> object:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def whole_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's whole state dict on rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_whole())


def _from_rank0() -> object:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def load_whole_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Rank 0's whole state dict, sent to every rank, each keeping its shards (a collective: torch's loader
    scatters from rank 0, so the other ranks' copies of the same file are not read)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state if torch.distributed.get_rank() == 0 else {}, options=_from_rank0())


def whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_whole())


def load_whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state if torch.distributed.get_rank() == 0 else {},
                             options=_from_rank0())

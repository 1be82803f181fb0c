"""LoRA adapters on the transformer, saved in the format diffusers' `load_lora_weights` reads.

training-facts.md: the plain `get_peft_model_state_dict` through the pipeline's `save_lora_weights`
loads bit-exact; `convert_state_dict_to_diffusers` would rename tensors that diffusers then drops.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load as load_safetensors

LORA_FILE = "pytorch_lora_weights.safetensors"
_PREFIX = "transformer."


#: SimpleTuner's lora_init_type → peft's init_lora_weights ("default" is peft's: Kaiming A, zero B).
INIT_TYPES = {"default": True, "gaussian": "gaussian", "olora": "olora", "pissa": "pissa"}


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: float | None, dropout: float,
             target_modules: list[str], init: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the base, add the adapter (initialised as lora_init_type says), return the trainable parameters."""
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=INIT_TYPES[init],
        target_modules=target_modules,
    )
    transformer.add_adapter(config)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for param in params:  # adapters train in float32 even on a bf16 base
        param.data = param.data.float()
    return params


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def lora_file_bytes(transformer: torch.nn.Module, pipeline_cls: type) -> bytes:
    """The adapter as diffusers writes it (keys `transformer.…lora_A.weight`, with adapter metadata)."""
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_cls.save_lora_weights(tmp, transformer_lora_layers=lora_state_dict(transformer))
        return (Path(tmp) / LORA_FILE).read_bytes()


def load_lora_bytes(transformer: torch.nn.Module, data: bytes) -> None:
    """Put saved adapter weights back into a transformer that already has the adapter (resume)."""
    state = {k.removeprefix(_PREFIX): v for k, v in load_safetensors(data).items()}
    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter file has tensors the model lacks: {unexpected[:5]}")

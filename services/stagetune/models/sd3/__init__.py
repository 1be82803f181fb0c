"""Stable Diffusion 3 / 3.5: component loaders, text and latent encoders, and the tiny test model.

``SD3TextEncoder`` and ``SD3LatentEncoder`` import torch, so they are resolved on first access: config
validation can import ``SD3_LORA_TARGET_MODULES`` from here without paying for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stagetune.models.sd3.components import (
    DIFFUSERS_SD3_LORA_TARGET_MODULES,
    SD3_LORA_TARGET_MODULES,
    SD3_LYCORIS_TARGET_MODULES,
    SD3TextModels,
    clear_component_cache,
    load_scheduler,
    load_text_encoders,
    load_tokenizers,
    load_transformer,
    load_vae,
)
from stagetune.models.sd3.tiny import TINY_SD3, build_tiny_sd3

if TYPE_CHECKING:
    from stagetune.models.sd3.text import SD3TextEncoder
    from stagetune.models.sd3.vae import SD3LatentEncoder

__all__ = [
    "DIFFUSERS_SD3_LORA_TARGET_MODULES",
    "SD3_LORA_TARGET_MODULES",
    "SD3_LYCORIS_TARGET_MODULES",
    "SD3LatentEncoder",
    "SD3TextEncoder",
    "SD3TextModels",
    "TINY_SD3",
    "build_tiny_sd3",
    "clear_component_cache",
    "load_scheduler",
    "load_text_encoders",
    "load_tokenizers",
    "load_transformer",
    "load_vae",
]


def __getattr__(name: str) -> Any:
    if name == "SD3TextEncoder":
        from stagetune.models.sd3.text import SD3TextEncoder

        return SD3TextEncoder
    if name == "SD3LatentEncoder":
        from stagetune.models.sd3.vae import SD3LatentEncoder

        return SD3LatentEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

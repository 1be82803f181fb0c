"""Loading Sana's parts through the shared loaders (models/loading.py): the same `from_pretrained` calls a
hub id takes, frozen parts memoised process-wide, the trained transformer fresh on every call.

torch, diffusers and transformers are imported inside the functions: config checks import this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stagetune.models.loading import (
    MODEL_LOAD_LOCK,
    default_dtype,
    freeze,
    load_pretrained,
    memoised,
    source_key,
)

if TYPE_CHECKING:
    import torch

#: SimpleTuner's Sana defaults (helpers/models/sana/model.py): LoRA on the attention projections (PEFT
#: suffixes: both the linear self-attention and the cross-attention), LyCORIS on Attention modules.
SANA_LORA_TARGET_MODULES: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
SANA_LYCORIS_TARGET_MODULES: tuple[str, ...] = ("Attention",)
#: SimpleTuner's `text_encoder_N` numbering → Sana's one text encoder (Gemma-2).
TEXT_ENCODER_KEYS = {"text_encoder_1": "text_encoder"}


@dataclass(frozen=True)
class SanaTextModels:
    tokenizer: Any
    text_encoder: Any


def _device_key(device: Any) -> str:
    import torch

    return str(torch.device(device))


def load_transformer(name_or_path: str, *, revision: str | None = None, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", subfolder: str = "transformer") -> Any:
    """A fresh transformer on every call: it is trained, so no two callers may share its parameters."""
    with MODEL_LOAD_LOCK:
        from diffusers import SanaTransformer2DModel

    model = load_pretrained(SanaTransformer2DModel.from_pretrained, name_or_path, subfolder, revision=revision,
                            torch_dtype=default_dtype(dtype))
    return model.to(device)


def load_vae(name_or_path: str, *, revision: str | None = None, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu", subfolder: str | None = "vae") -> Any:
    """The shared, frozen DC-AE (SimpleTuner keeps Sana's VAE in float32 unless told otherwise)."""
    with MODEL_LOAD_LOCK:
        from diffusers import AutoencoderDC

    dtype = default_dtype(dtype)
    key = ("sana-vae", source_key(name_or_path), revision or "", subfolder or "", str(dtype), _device_key(device))

    def load() -> Any:
        vae = load_pretrained(AutoencoderDC.from_pretrained, name_or_path, subfolder, revision=revision,
                              torch_dtype=dtype)
        return freeze(vae.to(device))

    return memoised(key, load)


def load_tokenizer(name_or_path: str, *, revision: str | None = None) -> Any:
    """Gemma's tokenizer, a new object per call (fast tokenizers are not safe to share between threads).

    ``add_bos_token=True`` as Sana needs it (transformers 5 leaves it out by default)."""
    with MODEL_LOAD_LOCK:
        from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "tokenizer", revision=revision,
                           add_bos_token=True)


def load_text_encoder(name_or_path: str, *, revision: str | None = None, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", precision: str = "no_change") -> SanaTextModels:
    """The tokenizer (fresh) and the shared, frozen Gemma-2 (quantised when `text_encoder_1_precision` asks)."""
    with MODEL_LOAD_LOCK:
        from transformers import Gemma2Model

    from stagetune.models.quantise import quantise

    dtype = default_dtype(dtype)
    key = ("sana-text", source_key(name_or_path), revision or "", str(dtype), _device_key(device), precision)

    def load() -> Any:
        model = load_pretrained(Gemma2Model.from_pretrained, name_or_path, "text_encoder", revision=revision,
                                dtype=dtype)
        quantise(model, precision, exclude=(), key="text_encoder_1_precision")
        return freeze(model.to(device))

    return SanaTextModels(tokenizer=load_tokenizer(name_or_path, revision=revision),
                          text_encoder=memoised(key, load))


def load_training_scheduler(name_or_path: str, *, revision: str | None = None) -> Any:
    """The flow-match table SimpleTuner trains Sana on: `FlowMatchEulerDiscreteScheduler` read from the model's
    scheduler config (Sana ships a DPM-Solver config; its `flow_shift` is not FlowMatchEuler's `shift`, so the
    table is unshifted, exactly as in SimpleTuner)."""
    with MODEL_LOAD_LOCK:
        from diffusers import FlowMatchEulerDiscreteScheduler

    return load_pretrained(FlowMatchEulerDiscreteScheduler.from_pretrained, name_or_path, "scheduler",
                           revision=revision)

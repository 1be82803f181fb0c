"""Loading SD3's parts, the one way every service does it.

Every loader goes through ``from_pretrained(name_or_path, subfolder=…, revision=…, torch_dtype=…)``, the code
path a hub id takes, so the tiny test model exercises exactly what production runs.

In the embedded mode all five services share one interpreter: frozen parts (VAE, text encoders) are
memoised process-wide so they are loaded once, keyed by (path, revision, dtype, device, component). The
transformer is trained, so every call returns a fresh copy; schedulers carry per-run step state, so they are
never shared either. Tokenizers are cheap and hugging-face fast tokenizers are not safe to share between
threads (setting padding/truncation mutates them), so each call gets its own.

torch and diffusers are imported inside the functions: config validation imports this module for
``SD3_LORA_TARGET_MODULES`` and must stay fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stagetune.models.loading import (
    MODEL_FIELD,
    MODEL_LOAD_LOCK,
    clear_component_cache,  # noqa: F401 - re-exported: models.sd3 and tests use it from here
    default_dtype,
    freeze,
    load_pretrained,
    memoised,
    source_key,
)

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

# SimpleTuner's default LoRA targets for SD3 (``lora_type: standard``): attention projections of the
# image stream only. Source: bghira/SimpleTuner, simpletuner/helpers/models/sd3/model.py,
# ``SD3.DEFAULT_LORA_TARGET`` (commit 06b96af6803a6ad7723b4d75a56d94dad1a06dfa). PEFT matches them as
# name suffixes, so they also hit ``attn2`` in SD3.5's dual-attention blocks, but never the context
# stream's ``add_*_proj``/``to_add_out``.
SD3_LORA_TARGET_MODULES: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
# SimpleTuner's default LyCORIS targets for SD3 (same file, ``DEFAULT_LYCORIS_TARGET``): module class names.
SD3_LYCORIS_TARGET_MODULES: tuple[str, ...] = ("Attention",)
# diffusers' own choice (examples/dreambooth/train_dreambooth_lora_sd3.py): both streams.
DIFFUSERS_SD3_LORA_TARGET_MODULES: tuple[str, ...] = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass(frozen=True)
class SD3TextModels:
    """SD3's three tokenizers and text encoders (CLIP-L, CLIP-G, T5), in the pipeline's order."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    tokenizer_3: T5Tokenizer
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel


def load_transformer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    subfolder: str = "transformer",
) -> SD3Transformer2DModel:
    """A fresh transformer on every call: it is trained, so no two callers may share its parameters."""
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from diffusers import SD3Transformer2DModel

    model = load_pretrained(
        SD3Transformer2DModel.from_pretrained,
        name_or_path,
        subfolder,
        revision=revision,
        torch_dtype=default_dtype(dtype),
    )
    return model.to(device)


def load_vae(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    subfolder: str | None = "vae",
    field: str = MODEL_FIELD,
) -> AutoencoderKL:
    """The shared, frozen VAE. ``subfolder=None`` for a standalone VAE (SimpleTuner's
    ``pretrained_vae_model_name_or_path``)."""
    import torch
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from diffusers import AutoencoderKL

    dtype = default_dtype(dtype)
    key = (
        "vae",
        source_key(name_or_path),
        revision or "",
        subfolder or "",
        str(dtype),
        str(torch.device(device)),
    )

    def load() -> AutoencoderKL:
        vae = load_pretrained(
            AutoencoderKL.from_pretrained,
            name_or_path,
            subfolder,
            field=field,
            revision=revision,
            torch_dtype=dtype,
        )
        # NHWC: oneDNN (CPU) and cuDNN run the VAE's convolutions without reordering every activation;
        # 1.6x faster on CPU at 256 px (benchmarks/README.md). Results differ from NCHW by ~1e-5.
        return freeze(vae.to(device).to(memory_format=torch.channels_last))

    return memoised(key, load)


def load_scheduler(
    name_or_path: str, *, revision: str | None = None, subfolder: str = "scheduler"
) -> FlowMatchEulerDiscreteScheduler:
    """A fresh scheduler per call: ``set_timesteps``/``step`` keep per-run state."""
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from diffusers import FlowMatchEulerDiscreteScheduler

    return load_pretrained(
        FlowMatchEulerDiscreteScheduler.from_pretrained, name_or_path, subfolder, revision=revision
    )


def load_tokenizers(
    name_or_path: str, *, revision: str | None = None
) -> tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer]:
    """SD3's three tokenizers, new objects on each call (see the module docstring on thread safety)."""
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from transformers import CLIPTokenizer, T5Tokenizer

    return (
        load_pretrained(CLIPTokenizer.from_pretrained, name_or_path, "tokenizer", revision=revision),
        load_pretrained(CLIPTokenizer.from_pretrained, name_or_path, "tokenizer_2", revision=revision),
        load_pretrained(T5Tokenizer.from_pretrained, name_or_path, "tokenizer_3", revision=revision),
    )


#: SimpleTuner's text_encoder_N_precision numbering → SD3's component subfolders.
TEXT_ENCODER_KEYS = {"text_encoder_1": "text_encoder", "text_encoder_2": "text_encoder_2",
                     "text_encoder_3": "text_encoder_3"}


def load_text_encoders(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantisation: Mapping[str, str] | None = None,
) -> SD3TextModels:
    """The three tokenizers (fresh) and the three shared, frozen text encoders.

    ``quantisation`` maps SimpleTuner's ``text_encoder_N`` to a precision (``int8-quanto``, …); a quantised
    encoder is a different shared object from the full-precision one.
    """
    import torch
    with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from stagetune.models.quantise import quantise

    dtype = default_dtype(dtype)
    source = source_key(name_or_path)
    precision_of = {TEXT_ENCODER_KEYS[key]: (key, value) for key, value in (quantisation or {}).items()}

    def encoder(cls: Any, subfolder: str) -> Any:
        key_name, precision = precision_of.get(subfolder, ("", "no_change"))
        key = ("text", source, revision or "", subfolder, str(dtype), str(torch.device(device)), precision)

        def load() -> Any:
            model = load_pretrained(
                cls.from_pretrained, name_or_path, subfolder, revision=revision, dtype=dtype
            )
            quantise(model, precision, exclude=(), key=f"{key_name}_precision")
            return freeze(model.to(device))

        return memoised(key, load)

    tokenizer, tokenizer_2, tokenizer_3 = load_tokenizers(name_or_path, revision=revision)
    return SD3TextModels(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        text_encoder=encoder(CLIPTextModelWithProjection, "text_encoder"),
        text_encoder_2=encoder(CLIPTextModelWithProjection, "text_encoder_2"),
        text_encoder_3=encoder(T5EncoderModel, "text_encoder_3"),
    )

"""Stable Diffusion 3 / 3.5 as a `ModelFamily` (models/family.py): what every stage asks about SD3.

Heavy modules (torch, diffusers, the encoders) are imported inside the methods: the family is consulted
while a config is checked, before torch is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stagetune.core.errors import Collector
from stagetune.models.loading import MODEL_LOAD_LOCK
from stagetune.models.sd3.components import TEXT_ENCODER_KEYS
from stagetune.models.sd3.options import OPTION_KEYS, parse_sd3_options

#: SimpleTuner's preview decoder for SD3 (a tiny autoencoder in the VAE's latent space).
PREVIEW_HUB_ID = "madebyollin/taesd3"

# SimpleTuner's SD3 quantisation exclusions (helpers/models/sd3/model.py): these stay in full precision.
QUANTISATION_EXCLUDE = ("context_embedder", "norm_out.linear", "proj_out", "time_text_embed.*", "*.norm1*.linear",
                        "pos_embed*")


class SD3Family:
    name = "sd3"
    option_keys = OPTION_KEYS
    lora_targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")  # SimpleTuner's DEFAULT_LORA_TARGET
    lycoris_targets: tuple[str, ...] = ("Attention",)  # SimpleTuner's DEFAULT_LYCORIS_TARGET (class names)
    quantisation_exclude = QUANTISATION_EXCLUDE
    text_option_keys = ("tokenizer_max_length", "t5_padding")
    text_encoder_components = TEXT_ENCODER_KEYS  # CLIP-L, CLIP-G, T5-XXL
    #: The transformer patchifies 2×2 latent pixels into one token.
    patch_size = 2

    # -- options (torch-free) ---------------------------------------------------------------------------
    def parse_options(self, values: Mapping[str, Any], *, context: Mapping[str, Any], problems: Collector,
                      warnings: list[str]) -> dict[str, Any]:
        return parse_sd3_options(values, context=context, problems=problems, warnings=warnings)

    def text_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"t5_max_length": int(options.get("tokenizer_max_length", 154)),
                "t5_padding": str(options.get("t5_padding", "unmodified"))}

    def sampling_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        layers = list(options.get("validation_guidance_skip_layers") or [])
        if not layers:
            return {}
        return {
            "skip_guidance_layers": [int(layer) for layer in layers],  # a Struct carries them as floats
            "skip_layer_guidance_scale": float(options["validation_guidance_skip_scale"]),
            "skip_layer_guidance_start": float(options["validation_guidance_skip_layers_start"]),
            "skip_layer_guidance_stop": float(options["validation_guidance_skip_layers_stop"]),
        }

    # -- models -----------------------------------------------------------------------------------------
    def load_transformer(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sd3.components import load_transformer

        return load_transformer(name_or_path, revision=revision, dtype=dtype)

    def text_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None,
                     quantisation: Mapping[str, str] | None = None) -> Any:
        """The weights load on the first `encode`: fingerprints and cache keys need only the files."""
        from stagetune.models.sd3.text import SD3TextEncoder

        return SD3TextEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False,
                                              quantisation=quantisation)

    def latent_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sd3.vae import SD3LatentEncoder

        return SD3LatentEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False)

    def pipeline_class(self) -> type:
        with MODEL_LOAD_LOCK:  # lazy library modules: one importing thread at a time (models/warmup.py)
            from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def flow_schedule_overrides(self, name_or_path: str, revision: str | None = None) -> dict[str, Any]:
        """Auto-shift parameters from the model's own scheduler config (the shift options stay the user's)."""
        from stagetune.models.sd3.components import load_scheduler

        config = load_scheduler(name_or_path, revision=revision).config
        return {
            "base_seq_len": int(config.get("base_image_seq_len", 256)),
            "max_seq_len": int(config.get("max_image_seq_len", 4096)),
            "base_shift": float(config.get("base_shift", 0.5)),
            "max_shift": float(config.get("max_shift", 1.15)),
        }

    def preview_decoder(self, name_or_path: str, *, revision: str | None = None) -> Any:
        """taesd3, as SimpleTuner's previews use: the model folder's own (the tiny test model ships one),
        else madebyollin/taesd3 from the hub."""
        from pathlib import Path

        from stagetune.models.sd3.tiny import PREVIEW_FOLDER

        local = Path(name_or_path).expanduser() / PREVIEW_FOLDER
        source = str(local) if local.is_dir() else PREVIEW_HUB_ID
        with MODEL_LOAD_LOCK:  # lazy library modules and init_empty_weights: one thread at a time (loading.py)
            from diffusers import AutoencoderTiny

            return AutoencoderTiny.from_pretrained(source).eval().requires_grad_(False)

    def preview_image(self, decoder: Any, latents: Any, max_edge: int = 256) -> Any:
        """A preview through taesd3 (×8 upsampling) of the unscaled latents."""
        from stagetune.models.previews import preview_from_latents
        from stagetune.models.sd3.tiny import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR

        z = latents.float() / SD3_VAE_SCALING_FACTOR + SD3_VAE_SHIFT_FACTOR
        return preview_from_latents(decoder, z, upsample=8, max_edge=max_edge)

    def training_latents(self, latents: Any) -> Any:
        return latents

    # -- training ---------------------------------------------------------------------------------------
    def collate_text(self, entries: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
                     empty: Sequence[bool]) -> dict[str, Any]:
        """Stack a batch's embeddings. For an empty caption (data or dropout), SimpleTuner's
        `sd3_clip_uncond_behaviour: zero` zeroes the prompt embeddings and `sd3_t5_uncond_behaviour: zero` the
        pooled ones (its text-embed cache does exactly this for the empty prompt)."""
        import torch

        embeds = torch.stack([e["prompt_embeds"] for e in entries])
        pooled = torch.stack([e["pooled_prompt_embeds"] for e in entries])
        mask = torch.tensor([not e for e in empty], dtype=embeds.dtype)
        if options.get("sd3_clip_uncond_behaviour") == "zero" and any(empty):
            embeds = embeds * mask.view(-1, 1, 1)
        if options.get("sd3_t5_uncond_behaviour") == "zero" and any(empty):
            pooled = pooled * mask.view(-1, 1)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def transformer_inputs(self, noisy: Any, timesteps: Any, text: Mapping[str, Any]) -> dict[str, Any]:
        return {"hidden_states": noisy, "timestep": timesteps, **text, "return_dict": False}

    def latent_seq_len(self, latents: Any) -> int:
        return (latents.shape[-1] // self.patch_size) * (latents.shape[-2] // self.patch_size)

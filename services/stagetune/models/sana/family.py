"""NVLabs Sana as a `ModelFamily` (models/family.py): what every stage asks about Sana.

SimpleTuner's Sana maths, kept so a SimpleTuner config trains the same model:
- text: Gemma-2 at 300 tokens with the complex human instruction on prompts (models/sana/text.py); the
  transformer takes the states and their attention mask;
- latents: DC-AE, ×32, 32 channels, scale only; the trainer halves them before noising
  (`Sana.LATENT_RESCALE = 0.5` in SimpleTuner's `prepare_batch`);
- noise schedule: σ drawn uniformly from the model's own flow-match table (`FlowMatchEulerDiscreteScheduler`
  read from its scheduler folder), ignoring the shift options, as SimpleTuner's `sample_flow_sigmas`;
- patch size 1, so the latent sequence is H × W of the latents.

Heavy modules are imported inside the methods: the family is consulted while a config is checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from stagetune.core.errors import Collector
from stagetune.models.loading import MODEL_LOAD_LOCK
from stagetune.models.sana.components import (
    SANA_LORA_TARGET_MODULES,
    SANA_LYCORIS_TARGET_MODULES,
    TEXT_ENCODER_KEYS,
)
from stagetune.models.sana.options import KEY as CHI_KEY
from stagetune.models.sana.options import OPTION_KEYS, SANA_MAX_SEQUENCE_LENGTH, parse_sana_options

#: SimpleTuner's `Sana.LATENT_RESCALE`: cached latents are halved before noise is added.
LATENT_RESCALE = 0.5


class SanaFamily:
    name = "sana"
    option_keys = OPTION_KEYS
    lora_targets = SANA_LORA_TARGET_MODULES
    lycoris_targets = SANA_LYCORIS_TARGET_MODULES
    quantisation_exclude: tuple[str, ...] = ()  # SimpleTuner excludes nothing for Sana
    text_option_keys = (CHI_KEY,)
    text_encoder_components = TEXT_ENCODER_KEYS
    patch_size = 1

    # -- options (torch-free) ---------------------------------------------------------------------------
    def parse_options(self, values: Mapping[str, Any], *, context: Mapping[str, Any], problems: Collector,
                      warnings: list[str]) -> dict[str, Any]:
        return parse_sana_options(values, context=context, problems=problems, warnings=warnings)

    def text_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"complex_human_instruction": list(options.get(CHI_KEY) or [])}

    def sampling_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validation renders the asked size (binning would silently sample at the nearest 1024-px bucket and
        resize) and prompts with the instruction training used."""
        return {"use_resolution_binning": False, "complex_human_instruction": list(options.get(CHI_KEY) or []),
                "max_sequence_length": SANA_MAX_SEQUENCE_LENGTH}

    # -- models -----------------------------------------------------------------------------------------
    def load_transformer(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sana.components import load_transformer

        return load_transformer(name_or_path, revision=revision, dtype=dtype)

    def text_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None,
                     quantisation: Mapping[str, str] | None = None) -> Any:
        from stagetune.models.sana.text import SanaTextEncoder

        return SanaTextEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False,
                                               quantisation=quantisation)

    def latent_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sana.vae import SanaLatentEncoder

        return SanaLatentEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False)

    def pipeline_class(self) -> type:
        with MODEL_LOAD_LOCK:
            from diffusers import SanaPipeline

        return SanaPipeline

    def flow_schedule_overrides(self, name_or_path: str, revision: str | None = None) -> dict[str, Any]:
        """The model's own σ table, sampled uniformly; shift options do not apply (SimpleTuner sets them off)."""
        from stagetune.models.sana.components import load_training_scheduler

        sigmas = load_training_scheduler(name_or_path, revision=revision).sigmas
        return {"sigma_table": tuple(float(s) for s in sigmas), "shift": 1.0, "auto_shift": False,
                "use_uniform": True, "use_beta": False}

    def preview_decoder(self, name_or_path: str, *, revision: str | None = None) -> Any:
        """The model's own DC-AE (there is no tiny Sana decoder); previews decode at most 8×8 latents."""
        from stagetune.models.sana.components import load_vae

        return load_vae(name_or_path, revision=revision)

    def preview_image(self, decoder: Any, latents: Any, max_edge: int = 256) -> Any:
        from stagetune.models.previews import preview_from_latents

        z = latents.float() / float(decoder.config.scaling_factor)
        upsample = 2 ** (len(decoder.config.encoder_block_out_channels) - 1)
        return preview_from_latents(decoder, z, upsample=upsample, max_edge=max_edge)

    # -- training ---------------------------------------------------------------------------------------
    def training_latents(self, latents: Any) -> Any:
        return latents * LATENT_RESCALE

    def collate_text(self, entries: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
                     empty: Sequence[bool]) -> dict[str, Any]:
        """A dropped caption is the empty caption's cached embedding (Sana has no zeroing option)."""
        import torch

        return {"encoder_hidden_states": torch.stack([e["prompt_embeds"] for e in entries]),
                "encoder_attention_mask": torch.stack([e["prompt_attention_mask"] for e in entries])}

    def transformer_inputs(self, noisy: Any, timesteps: Any, text: Mapping[str, Any]) -> dict[str, Any]:
        return {"hidden_states": noisy, "timestep": timesteps, **text, "return_dict": False}

    def latent_seq_len(self, latents: Any) -> int:
        return (latents.shape[-1] // self.patch_size) * (latents.shape[-2] // self.patch_size)

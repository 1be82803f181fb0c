"""The model-family protocol: what every stage asks a family, so no stage knows SD3 or Sana by name.

A family is one folder (`models/sd3/`, `models/sana/`) with a class implementing `ModelFamily`, registered
in `FAMILIES`. Config loading asks it for its own options (`parse_options`, torch-free); the text and vae
stages for encoders and cache keys; the trainer for the transformer, how a batch's text conditioning is
collated, what the transformer's forward takes, the latent sequence length, LoRA/LyCORIS targets and what
quantisation must leave alone; validation for the pipeline class and its sampling arguments.

This module imports nothing heavy: `get_family` is called while checking a config, before torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from stagetune.core.errors import Collector, NotSupportedError


@runtime_checkable
class TextEncoder(Protocol):
    """A family's prompt encoder; weights load on first use."""

    fingerprint: str

    def cache_key(self, caption: str, **options: Any) -> str: ...

    def tokenize(self, captions: list[str], **options: Any) -> Any: ...

    def encode(self, captions: list[str], *, tokens: Any = None, **options: Any) -> dict[str, Any]: ...

    def warm(self, **options: Any) -> Any: ...


@runtime_checkable
class LatentEncoder(Protocol):
    """A family's VAE (or DC-AE) wrapper: pixels in [-1, 1] → scaled training latents, and back."""

    fingerprint: str

    @property
    def latent_channels(self) -> int: ...

    @property
    def downsample(self) -> int: ...

    def latent_key(self, pixel_key: str) -> str: ...

    def encode(self, pixels: Any, seeds: list[int]) -> Any: ...

    def decode(self, latents: Any) -> Any: ...


@runtime_checkable
class ModelFamily(Protocol):
    name: str
    #: config.json keys this family reads (beside the family-neutral ones of core/config/train.py).
    option_keys: frozenset[str]
    #: PEFT target module names for `lora_type: standard`, and LyCORIS' (module class names) for `lycoris`.
    lora_targets: tuple[str, ...]
    lycoris_targets: tuple[str, ...]
    #: Module name patterns quantisation keeps in full precision (SimpleTuner's exclude lists).
    quantisation_exclude: tuple[str, ...]
    #: The option keys that change a caption's embeddings: what the model reads, compared as part of the model.
    text_option_keys: tuple[str, ...]
    #: SimpleTuner's `text_encoder_N` (of `text_encoder_N_precision`) → the pipeline component / subfolder.
    text_encoder_components: Mapping[str, str]

    def parse_options(self, values: Mapping[str, Any], *, context: Mapping[str, Any], problems: Collector,
                      warnings: list[str]) -> dict[str, Any]:
        """This family's options from config.json, typed and checked (SimpleTuner's rules), torch-free.

        `values` holds the keys of `option_keys` the config sets (null ones removed); `context` the
        family-neutral settings a check may need (validation_guidance, ...)."""
        ...

    def text_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options that change a caption's embeddings: part of its cache key and of the text request."""
        ...

    def text_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None,
                     quantisation: Mapping[str, str] | None = None) -> TextEncoder:
        """Built without loading (the weights load on the first encode); `quantisation` maps SimpleTuner's
        `text_encoder_N` to a precision."""
        ...

    def latent_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None
                       ) -> LatentEncoder: ...

    def load_transformer(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any: ...

    def pipeline_class(self) -> type: ...

    def collate_text(self, entries: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
                     dropped: Sequence[bool]) -> dict[str, Any]:
        """A batch's text conditioning from cached embeddings; `dropped[i]` marks a caption dropped for
        unconditional training (families may zero it instead of using the empty caption's embedding)."""
        ...

    def transformer_inputs(self, noisy: Any, timesteps: Any, text: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the transformer's forward for one batch."""
        ...

    def latent_seq_len(self, latents: Any) -> int:
        """Tokens the transformer sees per sample (resolution-dependent shift)."""
        ...

    def flow_schedule_overrides(self, name_or_path: str, revision: str | None = None) -> dict[str, Any]:
        """`FlowSchedule` fields the family sets over the config's (the scheduler's dynamic-shift parameters;
        Sana's σ table)."""
        ...

    def training_latents(self, latents: Any) -> Any:
        """Cached latents → what the trainer noises (Sana halves them, as SimpleTuner does)."""
        ...

    def preview_decoder(self, name_or_path: str, *, revision: str | None = None) -> Any:
        """The tiny decoder validation previews use (SD3: taesd3), loaded on the first preview."""
        ...

    def preview_image(self, decoder: Any, latents: Any, max_edge: int = 256) -> Any:
        """Sampling-time latents (as the pipeline holds them) → a small PIL image through the preview decoder."""
        ...

    def sampling_kwargs(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Extra pipeline arguments for validation from the family's options (e.g. SD3's skip-layer guidance)."""
        ...


#: family name → "module:Class" of its implementation (imported on first use, torch-free at import).
FAMILIES: dict[str, str] = {
    "sana": "stagetune.models.sana.family:SanaFamily",
    "sd3": "stagetune.models.sd3.family:SD3Family",
}

_instances: dict[str, ModelFamily] = {}


def family_names() -> tuple[str, ...]:
    return tuple(sorted(FAMILIES))


def get_family(name: str) -> ModelFamily:
    """The family called `name`, or NotSupportedError naming the ones there are."""
    if name not in FAMILIES:
        raise NotSupportedError(
            f"not supported yet: model_family={name} (stagetune supports {', '.join(family_names())})",
            field="model_family",
        )
    if name not in _instances:
        module, _, cls = FAMILIES[name].partition(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]


def all_option_keys() -> frozenset[str]:
    """Every config.json key some family reads: known to config loading, owned by one family."""
    return frozenset().union(*(get_family(name).option_keys for name in FAMILIES))

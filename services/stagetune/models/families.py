"""Model families as the services see them: one object per family with the same methods.

Services never import a family's modules directly; they ask `get_family(name)`, so adding Sana
is a new entry here plus its own folder, like torchtitan's one folder per model.
"""

from __future__ import annotations

import functools
from typing import Any

from stagetune.core.errors import NotSupportedError


class SD3Family:
    NAME = "sd3"

    @property
    def LORA_TARGET_MODULES(self) -> list[str]:  # noqa: N802 - a constant, loaded lazily
        from stagetune.models.sd3.components import SD3_LORA_TARGET_MODULES

        return list(SD3_LORA_TARGET_MODULES)

    def load_transformer(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sd3.components import load_transformer

        return load_transformer(name_or_path, revision=revision, dtype=dtype)

    def text_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        """The weights load on the first `encode`: fingerprints and cache keys need only the files."""
        from stagetune.models.sd3.text import SD3TextEncoder

        return SD3TextEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False)

    def latent_encoder(self, name_or_path: str, *, revision: str | None = None, dtype: Any = None) -> Any:
        from stagetune.models.sd3.vae import SD3LatentEncoder

        return SD3LatentEncoder.from_pretrained(name_or_path, revision=revision, dtype=dtype, load=False)

    def pipeline_class(self) -> type:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def flow_shift_params(self, name_or_path: str, revision: str | None = None) -> dict[str, Any]:
        """Auto-shift parameters from the model's own scheduler config."""
        from stagetune.models.sd3.components import load_scheduler

        config = load_scheduler(name_or_path, revision=revision).config
        return {
            "base_seq_len": int(config.get("base_image_seq_len", 256)),
            "max_seq_len": int(config.get("max_image_seq_len", 4096)),
            "base_shift": float(config.get("base_shift", 0.5)),
            "max_shift": float(config.get("max_shift", 1.15)),
        }


@functools.cache
def get_family(name: str) -> Any:
    if name == "sd3":
        return SD3Family()
    raise NotSupportedError(f"not supported yet: model_family={name}", field="model_family")

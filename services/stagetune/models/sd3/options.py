"""SD3's own config.json options, read with SimpleTuner's rules (torch-free: checked before training starts).

- `tokenizer_max_length`: T5's length, 154 by default; above 154 is clamped, as SimpleTuner's
  `SD3.check_user_config` does (it is part of the text-cache key).
- `t5_padding`: `unmodified`, or `zero` to zero T5's states past the prompt (part of the cache key).
- `sd3_clip_uncond_behaviour` / `sd3_t5_uncond_behaviour`: what a dropped caption is: the empty caption's
  embeddings (`empty_string`) or zeros (`zero`); the T5 setting follows the CLIP one when unset.
- `validation_guidance_skip_layers` (+ `_start`, `_stop`, `_scale`): SD3's skip-layer guidance in validation.
  Settings that can never fire (no CFG, too few steps) are warnings naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.values import check_choice, coerce
from stagetune.core.errors import Collector, ConfigError

T5_MAX_LENGTH = 154
UNCOND = ("empty_string", "zero")
OPTION_KEYS = frozenset({
    "tokenizer_max_length",
    "t5_padding",
    "sd3_clip_uncond_behaviour",
    "sd3_t5_uncond_behaviour",
    "validation_guidance_skip_layers",
    "validation_guidance_skip_layers_start",
    "validation_guidance_skip_layers_stop",
    "validation_guidance_skip_scale",
})


def parse_skip_layers(value: Any, key: str = "validation_guidance_skip_layers") -> list[int]:
    """[7, 8, 9], "[7, 8, 9]", "7,8,9" or 7; SimpleTuner json-loads the string form."""
    raw = value
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
        except json.JSONDecodeError:
            raise ConfigError(f"{key}: expected a list of layer indices, got {value!r}", field=key) from None
    if not isinstance(raw, list):
        raw = [raw]
    layers = [coerce(key, item, "int") for item in raw]
    if any(layer < 0 for layer in layers):
        raise ConfigError(f"{key}: layer indices must be >= 0, got {value!r}", field=key)
    return layers


def _fraction(key: str, value: Any) -> float:
    number = coerce(key, value, "float")
    if not 0.0 <= number <= 1.0:
        raise ConfigError(f"{key} must be between 0 and 1, got {number}", field=key)
    return number


def parse_sd3_options(values: Mapping[str, Any], *, context: Mapping[str, Any], problems: Collector,
                      warnings: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "tokenizer_max_length": T5_MAX_LENGTH,
        "t5_padding": st.OPTIONS["t5_padding"].default,
        "sd3_clip_uncond_behaviour": st.OPTIONS["sd3_clip_uncond_behaviour"].default,
        "sd3_t5_uncond_behaviour": None,
        "validation_guidance_skip_layers": [],
        "validation_guidance_skip_layers_start": st.OPTIONS["validation_guidance_skip_layers_start"].default,
        "validation_guidance_skip_layers_stop": st.OPTIONS["validation_guidance_skip_layers_stop"].default,
        "validation_guidance_skip_scale": st.OPTIONS["validation_guidance_skip_scale"].default,
    }
    for key, value in values.items():
        with problems.check():
            options[key] = _parse_one(key, value, warnings)
    if options["sd3_t5_uncond_behaviour"] is None:
        options["sd3_t5_uncond_behaviour"] = options["sd3_clip_uncond_behaviour"]
    _warn_skip_layers(options, context, warnings)
    return options


def _parse_one(key: str, value: Any, warnings: list[str]) -> Any:
    if key == "tokenizer_max_length":
        length = coerce(key, value, "int")
        if length < 1:
            raise ConfigError(f"tokenizer_max_length must be ≥ 1, got {length}", field=key)
        if length > T5_MAX_LENGTH:
            warnings.append(f"tokenizer_max_length={length} is above SD3's T5 limit: using {T5_MAX_LENGTH}, "
                            "as SimpleTuner does")
            length = T5_MAX_LENGTH
        return length
    if key == "validation_guidance_skip_layers":
        return parse_skip_layers(value, key)
    if key in ("validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop"):
        return _fraction(key, value)
    if key == "validation_guidance_skip_scale":
        return coerce(key, value, "float")
    text = str(coerce(key, value, "str")).strip()
    check_choice(key, text, st.OPTIONS[key].choices)
    return text


def _warn_skip_layers(options: Mapping[str, Any], context: Mapping[str, Any], warnings: list[str]) -> None:
    """Skip-layer guidance that can never fire is the user's to know (diffusers ignores it silently)."""
    layers = options["validation_guidance_skip_layers"]
    if not layers:
        return
    guidance = float(context.get("validation_guidance", 0.0))
    if guidance <= 1.0:
        warnings.append(
            f"validation_guidance_skip_layers={layers} has no effect: skip-layer guidance runs only with "
            f"classifier-free guidance, and validation_guidance={guidance} is <= 1")
        return
    steps = int(context.get("validation_num_inference_steps", 0))
    start = steps * options["validation_guidance_skip_layers_start"]
    stop = steps * options["validation_guidance_skip_layers_stop"]
    if not [i for i in range(steps) if start < i < stop]:
        warnings.append(
            f"validation_guidance_skip_layers={layers} never fires: with {steps} inference steps no step i "
            f"satisfies {start:g} < i < {stop:g} (validation_guidance_skip_layers_start/stop)")

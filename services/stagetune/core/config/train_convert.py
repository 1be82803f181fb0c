"""config.json values typed for TrainConfig, by SimpleTuner's value rules and our not-supported-yet checks.

A value SimpleTuner would refuse is a ConfigError; one it accepts that stagetune does not run yet is a
NotSupportedError, never a silent substitute. Every problem goes to the caller's Collector, so one run
reports all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.keys import suggest
from stagetune.core.config.no_effect import NO_EFFECT
from stagetune.core.config.optimizer_names import ALIASES as OPTIMIZER_ALIASES
from stagetune.core.config.optimizer_names import SUPPORTED as SUPPORTED_OPTIMIZERS
from stagetune.core.config.optimizer_names import canonical_name, parse_optimizer_config
from stagetune.core.config.train_defaults import FIELD_FOR_KEY, st_default, st_option
from stagetune.core.config.values import check_choice, coerce, is_default, show
from stagetune.core.errors import Collector, ConfigError, NotSupportedError
from stagetune.models.family import family_names, get_family
from stagetune.models.quantise import SUPPORTED as QUANTISATIONS

#: attention_mechanism values stagetune runs: diffusers' own, and SageAttention through diffusers' "sage" backend.
ATTENTION_BACKENDS = ("diffusers", "sageattention", "sageattention-int8-fp16-triton", "sageattention-int8-fp16-cuda",
                      "sageattention-int8-fp8-cuda")

#: Supported keys whose value must be one of a few; other values SimpleTuner accepts are "not supported yet".
SUPPORTED_VALUES: dict[str, frozenset[Any]] = {
    "model_type": frozenset({"lora", "full"}),
    "model_family": frozenset(family_names()),
    "lora_type": frozenset({"standard", "lycoris"}),
    "lora_init_type": frozenset({"default", "gaussian", "olora", "pissa"}),
    "mixed_precision": frozenset({"no", "bf16", "fp16"}),
    "attention_mechanism": frozenset(ATTENTION_BACKENDS),
    "base_model_precision": frozenset(QUANTISATIONS),
    **{f"text_encoder_{n}_precision": frozenset(QUANTISATIONS) for n in range(1, 5)},
}


def convert_no_effect(given: Mapping[str, Any], warnings: list[str], problems: Collector) -> dict[str, Any]:
    """Check no-effect options as SimpleTuner parses them; note the ones set away from its default."""
    accepted: dict[str, Any] = {}
    for key, value in given.items():
        with problems.check():
            option = st_option(key)
            converted = coerce(key, value, option.type)
            if isinstance(converted, str):
                converted = converted.strip()
            check_choice(key, converted, option.choices)
            accepted[key] = converted
            if not is_default(key, value):
                warnings.append(f"{key}={show(converted)} changes nothing here: {NO_EFFECT[key]}")
    return accepted


def convert_supported(given: Mapping[str, Any], problems: Collector, warnings: list[str]) -> dict[str, Any]:
    """Typed values for TrainConfig, with SimpleTuner's value rules and our not-supported-yet checks."""
    fields: dict[str, Any] = {}
    for key, value in given.items():
        with problems.check():
            _convert_one(key, value, fields)
    if str(given.get("optimizer", "")).strip().lower() == "adafactor":
        warnings.append("optimizer=adafactor is SimpleTuner's old name: using torch-adafactor (torch.optim.Adafactor), "
                        "the optimizer SimpleTuner moved it to")
    return fields


def _convert_one(key: str, value: Any, fields: dict[str, Any]) -> None:
    """One option's typed value into `fields` (under its TrainConfig name)."""
    option = st_option(key)
    name = FIELD_FOR_KEY.get(key, key)
    special = {
        "optimizer": _convert_optimizer,
        "optimizer_config": _convert_optimizer_config,
        "validation_resolution": parse_validation_resolution,
        "resume_from_checkpoint": _convert_resume,
    }
    if key in special:
        fields[name] = special[key](value)
        return
    if key in ("resolution", "minimum_image_size", "maximum_image_size", "target_downsample_size"):
        # pixels (int) or, with resolution_type "area", megapixels (float), as in multidatabackend.json
        number = coerce(key, value, "float")
        fields[name] = int(number) if number.is_integer() and not _is_float_literal(value) else number
        return
    converted = coerce(key, value, option.type)
    if isinstance(converted, str):
        converted = converted.strip()
    if key == "lr_scheduler" and converted == "cosine_with_warmup":
        converted = "cosine"  # SimpleTuner's alias
    if key == "caption_strategy" and converted == "instance_prompt":
        converted = "instanceprompt"
    choices = option.choices
    if key == "caption_strategy":
        choices = (*(choices or ()), "instanceprompt")
    check_choice(key, converted, choices, SUPPORTED_VALUES.get(key))
    if key == "validation_prompt" and converted == "":
        converted = None
    fields[name] = converted


def _is_float_literal(value: Any) -> bool:
    return isinstance(value, float) or (isinstance(value, str) and any(c in value for c in ".eE"))


def _convert_optimizer(value: Any) -> str:
    key = "optimizer"
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected an optimizer name, got {value!r}", field=key)
    name = canonical_name(value)
    if name in SUPPORTED_OPTIMIZERS:
        return name
    if name in st.OPTIMIZERS:
        raise NotSupportedError(f"not supported yet: optimizer={name} (stagetune runs {len(SUPPORTED_OPTIMIZERS)} of "
                                "SimpleTuner's optimizers; see the README)", field=key)
    hint = suggest(name, [*SUPPORTED_OPTIMIZERS, *OPTIMIZER_ALIASES])
    message = f"{key}: unknown optimizer {name!r}"
    if hint:
        message += f" (did you mean {hint!r}?)"
    raise ConfigError(message, field=key)


def _convert_optimizer_config(value: Any) -> str:
    text = value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in dict(value).items()) \
        if isinstance(value, Mapping) else None
    if text is None:
        raise ConfigError(f"optimizer_config: expected \"key=value,...\", got {value!r}", field="optimizer_config")
    parse_optimizer_config(text)  # the form is checked now; the optimizer checks the settings when built
    return text


def _convert_resume(value: Any) -> str | None:
    if isinstance(value, bool):
        if value:
            return "latest"
        return None
    text = str(value).strip()
    if text.lower() in {"none", "false", "no", "off"}:
        return None
    if text.lower() == "latest":
        return "latest"
    return text


def parse_validation_resolution(value: Any, key: str = "validation_resolution") -> list[tuple[int, int]]:
    """ "1024x1024,1280x768" or 1024 → [(width, height), ...], as SimpleTuner's parse_validation_resolutions.

    SimpleTuner reads a bare number under 128 as megapixels; only "1" (→ 1024) converts sensibly there, so any
    other such value is refused rather than turned into a surprising size.
    """
    items = value if isinstance(value, list) else [value]
    parts: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(f"{key}: expected WIDTHxHEIGHT or a number, got {item!r}", field=key)
        parts.extend(p.strip() for p in str(item).split(","))
    out: list[tuple[int, int]] = []
    for part in parts:
        text = part.lower()
        if not text:
            continue
        if "x" in text:
            pieces = text.split("x")
            if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
                raise ConfigError(f"{key}: invalid resolution {part!r} (expected WIDTHxHEIGHT)", field=key)
            width, height = (int(p) for p in pieces)
        else:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{key}: invalid resolution {part!r} (expected WIDTHxHEIGHT)", field=key) from None
            if number < 128:
                if number != 1:
                    raise ConfigError(
                        f"{key}: {part!r} looks like megapixels; give pixels, e.g. 1024 or 1024x1024",
                        field=key,
                    )
                number = 1024.0
            if not number.is_integer():
                raise ConfigError(f"{key}: invalid resolution {part!r}", field=key)
            width = height = int(number)
        if width <= 0 or height <= 0:
            raise ConfigError(f"{key}: invalid resolution {part!r}", field=key)
        out.append((width, height))
    if not out:
        raise ConfigError(f"{key}: no resolution given", field=key)
    return out


def family_options(fields: Mapping[str, Any], given: Mapping[str, Any], problems: Collector,
                   warnings: list[str]) -> dict[str, Any]:
    """The configured family reads its own keys; another family's keys change nothing here (noted)."""
    name = fields.get("model_family")
    if name not in family_names():
        return {}
    family = get_family(name)
    own = {key: value for key, value in given.items() if key in family.option_keys}
    for key in sorted(set(given) - set(own)):
        warnings.append(f"{key} changes nothing for model_family={name}: it belongs to another model family")
    context = {key: fields.get(key, st_default(key))
               for key in ("validation_guidance", "validation_num_inference_steps", "base_model_precision")}
    return family.parse_options(own, context=context, problems=problems, warnings=warnings)

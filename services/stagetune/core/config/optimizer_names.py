"""Which optimizer names stagetune runs (trainer/optimizers.py builds them), for checking a config before
torch is imported; SimpleTuner's other names are "not supported yet", anything else a typo."""

from __future__ import annotations

from typing import Any

from stagetune.core.errors import ConfigError

SUPPORTED = (
    "torch-adam", "torch-adamw", "torch-sgd", "torch-radam", "torch-nadam", "torch-rmsprop", "torch-adagrad",
    "torch-adadelta", "torch-adafactor", "torch-adamax", "torch-asgd", "adamw_bf16",
    "optimi-stableadamw", "optimi-adamw", "optimi-lion", "optimi-radam", "optimi-ranger", "optimi-adan",
    "optimi-adam", "optimi-sgd",
    "bnb-adagrad", "bnb-adagrad8bit", "bnb-adam", "bnb-adam8bit", "bnb-adamw", "bnb-adamw8bit", "bnb-adamw-paged",
    "bnb-adamw8bit-paged", "bnb-lion", "bnb-lion8bit", "bnb-lion-paged", "bnb-lion8bit-paged",
    "prodigy",
)

#: Older SimpleTuner names and other spellings users bring, and what they mean here.
ALIASES = {
    "adamw": "torch-adamw", "torch_adamw": "torch-adamw", "adamw_torch": "torch-adamw", "adamw-torch": "torch-adamw",
    "torch.optim.adamw": "torch-adamw",
    # SimpleTuner's old `adafactor` (seed 002's "option two"); it now points users at torch's Adafactor.
    "adafactor": "torch-adafactor",
}


def canonical_name(name: str) -> str:
    return ALIASES.get(name.strip().lower(), name.strip())


def parse_optimizer_config(text: str) -> dict[str, Any]:
    """SimpleTuner's `optimizer_config`: "key=value,key=value" with numbers, booleans and none read as such."""
    out: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"optimizer_config: {item!r} is not key=value", field="optimizer_config")
        out[key.strip()] = _value(raw.strip())
    return out


def _value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw

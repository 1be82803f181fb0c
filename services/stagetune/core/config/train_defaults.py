"""SimpleTuner's catalogue entry and default for a config.json key, under either its key or its TrainConfig name.

Every part of config.json's reading (the TrainConfig model, converting values, cross-checks) looks defaults up
here, so none of them can drift from SimpleTuner's catalogue (`simpletuner_keys`) or from each other.
"""

from __future__ import annotations

from typing import Any

from stagetune.core.config import simpletuner_keys as st

WHERE = "config.json"

#: config.json keys (canonical SimpleTuner spelling) that map to a differently named TrainConfig field.
FIELD_FOR_KEY = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
}
KEY_FOR_FIELD = {v: k for k, v in FIELD_FOR_KEY.items()}


def st_option(key: str) -> st.Option:
    """The catalogue entry; legacy global keys (e.g. instance_prompt) live in their own table."""
    return st.OPTIONS.get(key) or st.LEGACY_GLOBAL_OPTIONS[key]


def st_default(key: str) -> Any:
    """SimpleTuner's default, so TrainConfig's defaults cannot drift from the catalogue."""
    return st_option(KEY_FOR_FIELD.get(key, key)).default

"""How SimpleTuner reads an option's value, for core config and the families' own options alike.

`--key` values arrive as JSON numbers and booleans or as the strings argparse would have seen: parse them as
SimpleTuner's argparse types do (`_parse_bool_flag` for booleans), compare them with its defaults, and check
them against its choices (ConfigError) and against what stagetune supports (NotSupportedError).
"""

from __future__ import annotations

import math
from typing import Any

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.keys import suggest
from stagetune.core.errors import ConfigError, NotSupportedError

BOOL_TRUE = {"1", "true", "yes", "y", "on"}
BOOL_FALSE = {"0", "false", "no", "n", "off"}


def coerce(key: str, value: Any, kind: str) -> Any:
    """Parse a value as SimpleTuner's argparse type would, accepting JSON numbers and booleans directly."""
    if kind in ("bool", "bool_or_str"):
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in BOOL_TRUE:
                return True
            if text in BOOL_FALSE:
                return False
            if kind == "bool_or_str":
                return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}", field=key)
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", field=key)
        if isinstance(value, int):
            return value
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}", field=key) from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}", field=key)
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}", field=key)
        try:
            number = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}", field=key) from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}", field=key)
        return number
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value) if not isinstance(value, bool) else str(value).lower()
    return value  # lists/objects: validated by the field that takes them


def is_default(key: str, value: Any) -> bool:
    option = st.OPTIONS.get(key) or st.LEGACY_OPTIONS.get(key) or st.LEGACY_GLOBAL_OPTIONS[key]
    try:
        coerced = coerce(key, value, option.type)
    except ConfigError:
        return False
    default = option.default
    if isinstance(default, bool) or isinstance(coerced, bool):
        return coerced is default
    return coerced == default


def check_choice(key: str, value: Any, choices: tuple[Any, ...] | None,
                 supported: frozenset[Any] | None = None) -> None:
    """A value SimpleTuner rejects is a ConfigError; one it accepts but we do not, NotSupportedError."""
    if choices is not None and value not in choices:
        hint = suggest(str(value), [str(c) for c in choices])
        message = f"{key}: invalid value {show(value)}; SimpleTuner accepts {show_list(choices)}"
        if hint:
            message += f" (did you mean {hint!r}?)"
        raise ConfigError(message, field=key)
    allowed = supported
    if allowed is not None and value not in allowed:
        raise NotSupportedError(
            f"not supported yet: {key}={show(value)} (stagetune supports {show_list(allowed)})", field=key
        )


def show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def show_list(values: Any) -> str:
    return ", ".join(sorted(show(v) for v in values))

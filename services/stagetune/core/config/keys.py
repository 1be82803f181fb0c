"""Key checking shared by config.json and multidatabackend.json.

SimpleTuner accepts `--key` and `key`; an unknown key must never be ignored silently (a typo would
train with a default the user did not choose), so it is an error with the closest known key.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from stagetune.core.errors import Collector, ConfigError, NotSupportedError


def normalise_key(key: str) -> str:
    """`--learning_rate`, `learning_rate` and `learning-rate` all name one option."""
    return key.lstrip("-").replace("-", "_")


def suggest(key: str, known: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_error(key: str, known: Iterable[str], where: str) -> ConfigError:
    hint = suggest(key, known)
    message = f"unknown key in {where}: {key!r}"
    if hint:
        message += f" (did you mean {hint!r}?)"
    return ConfigError(message, field=key)


def check_keys(
    data: Mapping[str, Any],
    *,
    supported: Iterable[str],
    recognised_unsupported: Iterable[str] = (),
    where: str,
    inert_values: Mapping[str, Iterable[Any]] | None = None,
    problems: Collector | None = None,
) -> dict[str, Any]:
    """Normalise keys and reject unknown or not-yet-supported ones, every one of them in one pass.

    `recognised_unsupported` are keys SimpleTuner documents that we do not implement yet; they are
    accepted only when set to a value that changes nothing (`inert_values`, e.g. `false`, `null`),
    so a config that merely mentions them at their default still loads. Refused keys go to `problems`
    when given (the caller reports them with its own); otherwise they are raised together here.
    """
    supported = set(supported)
    unsupported = set(recognised_unsupported)
    inert_values = inert_values or {}
    collected = problems if problems is not None else Collector()
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = normalise_key(raw_key)
        if key in out:
            collected.add(ConfigError(f"key {key!r} given twice in {where}", field=key))
        elif key in supported:
            out[key] = value
        elif key in unsupported:
            if not _is_inert(value, inert_values.get(key, (None,))):
                collected.add(NotSupportedError(f"not supported yet: {key} (in {where}, value {value!r})", field=key))
        else:
            collected.add(unknown_key_error(key, supported | unsupported, where))
    if problems is None:
        collected.raise_if_any(where)
    return out


def _is_inert(value: Any, inert: Iterable[Any]) -> bool:
    """A boolean matches only itself (`true` is not `1`); other values compare by equality."""
    if isinstance(value, bool):
        return any(v is value for v in inert)
    return value in inert

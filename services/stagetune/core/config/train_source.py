"""config.json as the user wrote it, read into canonical keys and the values SimpleTuner would see.

This is everything before a value is typed: where the options come from (a file, JSON text, a mapping),
key spellings (`--key`, aliases, renamed legacy keys), overrides, `{env:VAR}`, and null or empty values
(SimpleTuner's default applies). Converting and checking the values is `train_convert`'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.files import read_json_file
from stagetune.core.config.keys import normalise_key, unknown_key_error
from stagetune.core.config.train_defaults import WHERE
from stagetune.core.config.values import BOOL_FALSE
from stagetune.core.errors import Collector, ConfigError

#: Keys whose empty string SimpleTuner passes through (its `allow_empty` fields) instead of meaning "default":
#: an empty negative prompt means "no negative prompt", not "blurry, cropped, ugly".
ALLOW_EMPTY = frozenset({"validation_prompt", "validation_negative_prompt"})

_ENV_PATTERN = re.compile(r"\{env:([^{}]*)\}")


def read_source(source: Path | str | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """The options and the file they came from (None for a mapping: relative paths then use base_dir only)."""
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(
            f"{WHERE} must be a JSON object of option -> value, got {_json_kind(source)}", field="config"
        )
    path = Path(source)
    data = read_json_file(path, what="config file", field="config")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a JSON object of option -> value, got {_json_kind(data)}", field="config"
        )
    return data, path


def config_from_json(text: str, where: str = WHERE) -> dict[str, Any]:
    """config.json as JSON text (what the gRPC API carries): a JSON object, or a ConfigError naming what it is.

    Never pass the parsed value to `load_train_config` unchecked: a JSON string would be read as a path.
    """
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}", field="config_json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object of option -> value, got {_json_kind(data)}",
                          field="config_json")
    return data


def _json_kind(value: Any) -> str:
    """How a user would name what they wrote: 'a list', 'a string', ..."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def merge_overrides(
    data: Mapping[str, Any], overrides: Mapping[str, Any] | None, warnings: list[str]
) -> dict[str, tuple[str, Any]]:
    """Canonical key → (key as written, value), the overrides winning over the file in any key spelling."""
    merged = _canonical(data, WHERE, warnings)
    for key, item in _canonical(overrides or {}, "overrides").items():
        merged[key] = item
    return merged


def _canonical(raw: Mapping[str, Any], what: str, warnings: list[str] | None = None) -> dict[str, tuple[str, Any]]:
    """Canonical key → (key as written, value). One option given under two spellings (a config pasted
    together from a guide's snippets: `validation_guidance` and `--validation_guidance`) takes the later
    value, as SimpleTuner's argument parser does, with a warning when the two differ."""
    out: dict[str, tuple[str, Any]] = {}
    for raw_key, value in raw.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{what}: keys must be strings, got {raw_key!r}")
        key = normalise_key(raw_key)
        key = st.ALIASES.get(key, key)
        key = st.RENAMED_LEGACY_KEYS.get(key, key)
        if key == "vae_cache_preprocess":  # SimpleTuner's old spelling: false means encode during training
            if str(value).strip().lower() not in BOOL_FALSE | {"none", ""} or value is None:
                continue
            key, value = "vae_cache_ondemand", True
        if key in out and out[key][1] != value and warnings is not None:
            warnings.append(f"{what}: {out[key][0]!r} and {raw_key!r} both set {key}: using the later, {value!r}, "
                            "as SimpleTuner does")
        out[key] = (raw_key, value)
    return out


def given_values(
    merged: Mapping[str, tuple[str, Any]], known: Set[str], problems: Collector, warnings: list[str]
) -> dict[str, Any]:
    """The values the user actually set, `{env:VAR}` expanded: null and empty mean SimpleTuner's default, and
    keys SimpleTuner ignores are dropped with a note. A null under an unknown key is still a typo."""
    values: dict[str, Any] = {}
    for key, (raw_key, value) in merged.items():
        with problems.check():
            value = _expand_env(value, key)
            if value is None or (isinstance(value, str) and not value.strip() and key not in ALLOW_EMPTY):
                if key not in known:
                    raise unknown_key_error(key, known, WHERE)
                continue  # SimpleTuner skips null and empty values: its default applies
            if key in st.IGNORED_KEYS:
                warnings.append(
                    f"{raw_key} is ignored in {WHERE} (SimpleTuner ignores it too; per-dataset options go in "
                    "multidatabackend.json)"
                )
                continue
            values[key] = value
    return values


def _expand_env(value: Any, key: str) -> Any:
    """`{env:VAR}` anywhere in a string (also inside lists and objects), as SimpleTuner's template_vars."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{key}: environment variable {name!r} is not set (used as {{env:{name}}} in {WHERE})",
                    field=key,
                )
            return os.environ[name]

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, list):
        return [_expand_env(v, key) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, key) for k, v in value.items()}
    return value

"""Typed values of one multidatabackend.json entry: every error names the dataset id and the key, so a user with
ten datasets knows which entry to fix."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagetune.core.config.dataset_keys import (
    INERT_VALUES,
    PARQUET_KEYS_RECOGNISED,
    PARQUET_KEYS_SUPPORTED,
    SKIP_FILE_DISCOVERY_WORDS,
)
from stagetune.core.config.keys import check_keys
from stagetune.core.errors import ConfigError, NotSupportedError


@dataclass(frozen=True)
class ParquetConfig:
    """A dataset's `parquet` block: a Parquet or JSON Lines table of captions (and optionally sizes) per file.

    Defaults are SimpleTuner's (`configure_parquet_database`, `ParquetMetadataBackend`): filename column
    `id`, caption column `description`, width/height columns `width`/`height`, identifiers without extension.
    """

    path: Path
    filename_column: str = "id"
    caption_column: str | tuple[str, ...] = "description"
    fallback_caption_column: str | None = None
    identifier_includes_extension: bool = False
    width_column: str = "width"
    height_column: str = "height"

    @property
    def is_json_lines(self) -> bool:
        return self.path.suffix.lower() in (".jsonl", ".json")

    def options(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "filename_column": self.filename_column,
            "caption_column": list(self.caption_column)
            if isinstance(self.caption_column, tuple)
            else self.caption_column,
            "fallback_caption_column": self.fallback_caption_column,
            "identifier_includes_extension": self.identifier_includes_extension,
            "width_column": self.width_column,
            "height_column": self.height_column,
        }


#: One `crop_aspect_buckets` entry: (aspect, weight); weight is None for a plain list of aspects.
AspectBucket = tuple[float, float | None]




# ---------------------------------------------------------------------------------------------------
# Value coercion: every error names the dataset id and the key.


def dataset_label(dataset_id: str) -> str:
    return f"dataset {dataset_id!r}"


def as_bool(value: Any, dataset_id: str, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {
        "true",
        "1",
        "yes",
        "on",
        "false",
        "0",
        "no",
        "off",
        "",
    }:
        return value.strip().lower() in {"true", "1", "yes", "on"}
    raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be true or false, got {value!r}", field=key)


def as_number(value: Any, dataset_id: str, key: str, *, allow_none: bool = True) -> float | None:
    if value is None or value == "":
        if allow_none:
            return None
        raise ConfigError(f"{dataset_label(dataset_id)}: {key} is required", field=key)
    if isinstance(value, bool):
        raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be a number, got {value!r}", field=key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be a number, got {value!r}", field=key) from None
    if not math.isfinite(number) or number < 0:
        raise ConfigError(
            f"{dataset_label(dataset_id)}: {key} must be a finite number ≥ 0, got {value!r}", field=key
        )
    return int(number) if number.is_integer() else number


def as_int(value: Any, dataset_id: str, key: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    number = as_number(value, dataset_id, key)
    if number is None or not float(number).is_integer():
        raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be a whole number, got {value!r}", field=key)
    return int(number)


def as_choice(value: Any, dataset_id: str, key: str, allowed: Sequence[str], later: Sequence[str] = ()) -> str:
    text = str(value).strip().lower() if value is not None else ""
    if text in allowed:
        return text
    if text in later:
        raise NotSupportedError(
            f"not supported yet: {key}={text!r} (in {dataset_label(dataset_id)}; supported: {', '.join(allowed)})",
            field=key,
        )
    raise ConfigError(
        f"{dataset_label(dataset_id)}: {key} must be one of {', '.join(allowed)}, got {value!r}", field=key
    )


def optional_str(value: Any, dataset_id: str, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be a string, got {value!r}", field=key)
    return value


def resolve_path(raw: str, base_dir: Path | None) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve()


def parse_crop_aspect_buckets(value: Any, dataset_id: str) -> tuple[AspectBucket, ...]:
    """A list of aspects, or of `{"aspect": a, "weight": w}` with weights summing to 1 (as SimpleTuner)."""
    key = "crop_aspect_buckets"
    where = dataset_label(dataset_id)
    if value is None or value == []:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key} must be a list of aspect ratios, got {value!r}", field=key)
    out: list[AspectBucket] = []
    for item in value:
        if isinstance(item, Mapping):
            unknown = set(item) - {"aspect", "weight"}
            if unknown or "aspect" not in item or "weight" not in item:
                raise ConfigError(
                    f'{where}: {key} entries must be numbers or {{"aspect": float, "weight": float}}, got {item!r}',
                    field=key,
                )
            aspect = as_number(item["aspect"], dataset_id, key, allow_none=False)
            weight = as_number(item["weight"], dataset_id, key, allow_none=False)
            assert aspect is not None and weight is not None
            out.append((float(aspect), float(weight)))
        else:
            aspect = as_number(item, dataset_id, key, allow_none=False)
            assert aspect is not None
            out.append((float(aspect), None))
    if any(aspect <= 0 for aspect, _ in out):
        raise ConfigError(f"{where}: {key} aspect ratios must be > 0, got {value!r}", field=key)
    weighted = [w is not None for _, w in out]
    if any(weighted) and not all(weighted):
        raise ConfigError(f"{where}: {key} mixes plain aspects and weighted entries", field=key)
    if all(weighted) and abs(sum(w or 0.0 for _, w in out) - 1.0) > 1e-6:
        raise ConfigError(f"{where}: the weights of {key} must add up to 1 (as in SimpleTuner)", field=key)
    return tuple(out)


def parse_parquet_config(value: Any, dataset_id: str, base_dir: Path | None) -> ParquetConfig | None:
    where = dataset_label(dataset_id)
    if value is None or value == {}:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: parquet must be an object, got {value!r}", field="parquet")
    data = check_keys(
        value,
        supported=PARQUET_KEYS_SUPPORTED,
        recognised_unsupported=PARQUET_KEYS_RECOGNISED,
        inert_values=INERT_VALUES,
        where=f"{where}, parquet",
    )
    raw_path = data.get("path")
    if not raw_path or not isinstance(raw_path, str):
        raise ConfigError(f"{where}: parquet.path is required (a .parquet or .jsonl file)", field="parquet.path")

    def column(key: str, default: str) -> str:
        name = data.get(key)
        if name is None:
            return default
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: parquet.{key} must be a column name, got {name!r}", field=f"parquet.{key}")
        return name

    raw_caption = data.get("caption_column")
    caption_column: str | tuple[str, ...]
    if isinstance(raw_caption, list):
        if not raw_caption or not all(isinstance(c, str) and c for c in raw_caption):
            raise ConfigError(
                f"{where}: parquet.caption_column must be a column name or a list of them",
                field="parquet.caption_column",
            )
        caption_column = tuple(raw_caption)
    else:
        caption_column = column("caption_column", "description")
    fallback = data.get("fallback_caption_column")
    if fallback is not None and (not isinstance(fallback, str) or not fallback):
        raise ConfigError(
            f"{where}: parquet.fallback_caption_column must be a column name, got {fallback!r}",
            field="parquet.fallback_caption_column",
        )
    return ParquetConfig(
        path=resolve_path(raw_path, base_dir),
        filename_column=column("filename_column", "id"),
        caption_column=caption_column,
        fallback_caption_column=fallback,
        identifier_includes_extension=as_bool(
            data.get("identifier_includes_extension"), dataset_id, "parquet.identifier_includes_extension"
        ),
        width_column=column("width_column", "width"),
        height_column=column("height_column", "height"),
    )


def parse_skip_file_discovery(value: Any, dataset_id: str) -> str:
    if value is None or value is False or value == "":
        return ""
    if not isinstance(value, str):
        raise ConfigError(
            f"{dataset_label(dataset_id)}: skip_file_discovery must be a string such as \"vae aspect metadata\"",
            field="skip_file_discovery",
        )
    words = [w for w in value.replace(",", " ").split() if w]
    unknown = [w for w in words if w.lower() not in SKIP_FILE_DISCOVERY_WORDS]
    if unknown:
        raise ConfigError(
            f"{dataset_label(dataset_id)}: skip_file_discovery: unknown value(s) {', '.join(unknown)} "
            f"(known: {', '.join(SKIP_FILE_DISCOVERY_WORDS)})",
            field="skip_file_discovery",
        )
    return " ".join(w.lower() for w in words)


def load_caption_filter_list(value: Any, where: str, base_dir: Path | None = None) -> tuple[str, ...]:
    """SimpleTuner's `caption_filter_list`: a JSON list, or a path to a `.txt` (one entry a line) or `.json` file.

    Lines keep their trailing spaces ("arafed " removes the word and its space); only line ends go. Any
    other form is an error here: SimpleTuner silently ignores it, which trains on unfiltered captions.
    """
    key = "caption_filter_list"
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: {key} must be a list of strings", field=key)
        return tuple(v for v in value if v)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a list of strings or a path to a .txt/.json file", field=key)
    path = resolve_path(value, base_dir)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json"):
        raise ConfigError(f"{where}: {key} path must end in .txt or .json, got {value!r}", field=key)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: {key} file not found: {path}", field=key) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {key} file unreadable: {path}: {exc}", field=key) from None
    if suffix == ".txt":
        return tuple(line for line in text.splitlines() if line)
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {key} file {path} is not valid JSON: {exc}", field=key) from None
    return load_caption_filter_list(loaded, where, base_dir)


def positive_int(value: Any, dataset_id: str, key: str) -> int | None:
    """Whole number ≥ 1, or None when unset (SimpleTuner treats 0 and "" as unset too)."""
    number = as_int(value, dataset_id, key, None)
    return number if number else None


# ---------------------------------------------------------------------------------------------------


def aws_fields(data: Mapping[str, Any], dataset_id: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("aws_bucket_name", "aws_data_prefix", "aws_endpoint_url", "aws_region_name",
                "aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{dataset_label(dataset_id)}: {key} must be a string", field=key)
        out[key] = value or None
    out["aws_max_pool_connections"] = as_int(data.get("aws_max_pool_connections"), dataset_id,
                                           "aws_max_pool_connections", None)
    return out

"""Caption tables (`caption_strategy: parquet` / `metadata_backend: parquet`) and `caption_filter_list`.

SimpleTuner users with large datasets keep captions (and often width/height) in one Parquet or JSON Lines
table instead of a `.txt` per image, so ingest reads the table once per dataset and looks each file up by
its identifier. Behaviour follows SimpleTuner's `ParquetMetadataBackend`, `configure_parquet_database` and
`PromptHandler.prepare_instance_prompt_from_parquet` / `_normalize_caption_payload`:

- the identifier is the path relative to `instance_data_dir`, without its extension unless
  `identifier_includes_extension`; SimpleTuner's size lookup uses the bare file stem, so that is tried
  second (it only differs for files in sub-folders);
- a caption cell may be a string or a list (several captions); `caption_column` may be a list of columns;
  when the caption is missing or empty the `fallback_caption_column` is used (as DATALOADER.md says;
  SimpleTuner's code only falls back on null);
- width/height cells may be numbers, numeric strings or one-element lists (`_get_first_value`).

Parquet needs `pyarrow`; JSON Lines (`.jsonl`) and JSON (`.json`, a list of row objects) need nothing.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stagetune.core.config.dataset import ParquetConfig
from stagetune.core.errors import ConfigError, InputError, PreconditionError


@dataclass(frozen=True)
class TableEntry:
    identifier: str
    captions: list[str]
    size: tuple[int, int] | None
    #: Why the row cannot give a size (bad width/height cell), or None.
    size_problem: str | None = None


@dataclass
class CaptionTable:
    config: ParquetConfig
    entries: dict[str, TableEntry] = field(default_factory=dict)

    def identifiers_for(self, relative_path: str) -> list[str]:
        path = PurePosixPath(relative_path)
        if self.config.identifier_includes_extension:
            candidates = [relative_path, path.name]
        else:
            candidates = [posixpath.splitext(relative_path)[0], posixpath.splitext(path.name)[0]]
        return list(dict.fromkeys(candidates))

    def lookup(self, relative_path: str) -> TableEntry | None:
        for identifier in self.identifiers_for(relative_path):
            entry = self.entries.get(identifier)
            if entry is not None:
                return entry
        return None

    def describe(self) -> str:
        columns = self.config.caption_column
        caption = ", ".join(columns) if isinstance(columns, tuple) else columns
        text = f"{self.config.path.name} (filename_column {self.config.filename_column}, caption_column {caption}"
        if self.config.fallback_caption_column:
            text += f", fallback_caption_column {self.config.fallback_caption_column}"
        return text + ")"


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def normalise_caption_cell(value: Any) -> list[str]:
    """SimpleTuner's `_normalize_caption_payload`: strings stripped, lists and dicts flattened, empties dropped."""
    if _is_null(value):
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        text = value.strip()
        return [text] if text else []
    if isinstance(value, Mapping):
        return [c for item in value.values() for c in normalise_caption_cell(item)]
    if isinstance(value, (list, tuple)):
        return [c for item in value for c in normalise_caption_cell(item)]
    text = str(value).strip()
    return [text] if text else []


def _first_value(value: Any) -> Any:
    """SimpleTuner's `_get_first_value`: unwrap one-element lists, parse numeric strings."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, str):
        try:
            return float(value) if "." in value else int(value)
        except ValueError:
            return value
    return value


def _size_from_row(row: Mapping[str, Any], config: ParquetConfig) -> tuple[tuple[int, int] | None, str | None]:
    width, height = _first_value(row.get(config.width_column)), _first_value(row.get(config.height_column))
    if _is_null(width) or _is_null(height):
        return None, f"no {config.width_column}/{config.height_column} in {config.path.name}"
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        return None, f"{config.width_column}/{config.height_column} not numbers: {width!r}x{height!r}"
    if not (w.is_integer() and h.is_integer() and w > 0 and h > 0):
        return None, f"{config.width_column}/{config.height_column} not positive whole numbers: {width!r}x{height!r}"
    return (int(w), int(h)), None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ConfigError(f"parquet.path not found: {path}", field="parquet.path")
    if suffix == ".jsonl":
        rows: list[dict[str, Any]] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}: line {number} is not valid JSON: {exc}", field="parquet.path") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}: line {number} is not a JSON object", field="parquet.path")
                rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}", field="parquet.path") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{path}: a .json caption table must be a list of row objects", field="parquet.path")
        return data
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PreconditionError(
            f"reading {path.name} needs the 'pyarrow' package (pip install pyarrow), "
            "or give parquet.path a JSON Lines (.jsonl) file with the same columns",
            field="parquet.path",
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: cannot read Parquet: {exc}", field="parquet.path") from None


def load_caption_table(config: ParquetConfig, *, with_sizes: bool) -> CaptionTable:
    """Read the whole table once; check that the configured columns exist (as `configure_parquet_database`)."""
    rows = _read_rows(config.path)
    columns: set[str] = set()
    for row in rows:
        columns.update(row)
    caption_columns = config.caption_column if isinstance(config.caption_column, tuple) else (config.caption_column,)
    needed = [("filename_column", config.filename_column)]
    needed += [("caption_column", c) for c in caption_columns]
    if config.fallback_caption_column:
        needed.append(("fallback_caption_column", config.fallback_caption_column))
    if with_sizes:
        needed += [("width_column", config.width_column), ("height_column", config.height_column)]
    for key, name in needed:
        if rows and name not in columns:
            raise ConfigError(
                f"{config.path.name} has no column {name!r} (parquet.{key}); columns: {', '.join(sorted(columns))}",
                field=f"parquet.{key}",
            )
    table = CaptionTable(config=config)
    for row in rows:
        raw_id = row.get(config.filename_column)
        if _is_null(raw_id):
            continue
        identifier = str(raw_id)
        if not config.identifier_includes_extension:
            identifier = posixpath.splitext(identifier)[0]
        captions = [c for name in caption_columns for c in normalise_caption_cell(row.get(name))]
        if not captions and config.fallback_caption_column:
            captions = normalise_caption_cell(row.get(config.fallback_caption_column))
        size, size_problem = _size_from_row(row, config) if with_sizes else (None, None)
        table.entries[identifier] = TableEntry(identifier, captions, size, size_problem)
    return table


# ---------------------------------------------------------------------------------------------------
# caption_filter_list


def _sed(item: str) -> tuple[str, str] | None:
    """`s/search/replace` (what SimpleTuner's code accepts) or `s/search/replace/` (what its docs show)."""
    if not item.startswith("s/"):
        return None
    parts = item.split("/")
    if len(parts) == 3:
        return parts[1], parts[2]
    if len(parts) == 4 and parts[3] == "":
        return parts[1], parts[2]
    return None


@dataclass(frozen=True)
class CaptionFilter:
    """SimpleTuner's `PromptHandler.filter_captions`, compiled once.

    Each entry in order: a sed-style `s/a/b/` replaces every match of regex `a` by `b`; any other entry is
    removed as a plain string and then as a regular expression (an entry that is not a valid regex is only
    removed as a string, as SimpleTuner logs and goes on).
    """

    items: tuple[str, ...]
    _compiled: tuple[tuple[str, re.Pattern[str] | None, str | None], ...] = field(
        default=(), init=False, repr=False, compare=False
    )
    invalid: tuple[str, ...] = field(default=(), init=False, compare=False)

    def __post_init__(self) -> None:
        compiled: list[tuple[str, re.Pattern[str] | None, str | None]] = []
        invalid: list[str] = []
        for item in self.items:
            sed = _sed(item)
            try:
                if sed:
                    compiled.append((item, re.compile(sed[0]), sed[1]))
                else:
                    compiled.append((item, re.compile(item), None))
            except re.error:
                invalid.append(item)
                compiled.append((item, None, None))
        object.__setattr__(self, "_compiled", tuple(compiled))
        object.__setattr__(self, "invalid", tuple(invalid))

    def __bool__(self) -> bool:
        return bool(self.items)

    def apply(self, caption: str) -> str:
        for item, pattern, replacement in self._compiled:
            if replacement is not None and pattern is not None:
                caption = pattern.sub(replacement, caption)
                continue
            caption = caption.replace(item, "")
            if pattern is not None:
                caption = pattern.sub("", caption)
        return caption

    def apply_all(self, captions: Iterable[str]) -> list[str]:
        """Filtered captions, stripped, empty ones dropped (an emptied caption would train as the null caption)."""
        out = []
        for caption in captions:
            text = self.apply(caption).strip() if self.items else caption
            if text:
                out.append(text)
        return out


def caption_filter(items: Sequence[str]) -> CaptionFilter:
    return CaptionFilter(tuple(items))


__all__ = [
    "CaptionFilter",
    "CaptionTable",
    "TableEntry",
    "caption_filter",
    "load_caption_table",
    "normalise_caption_cell",
]

"""Reading the user's JSON files (config.json, multidatabackend.json, prompt libraries) with one set of errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagetune.core.errors import ConfigError


def read_json_file(path: Path | str, *, what: str, field: str) -> Any:
    """The parsed file, or a ConfigError naming it and what is wrong (missing, a folder, unreadable, not JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}", field=field) from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a JSON file", field=field) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}", field=field) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON: {exc}", field=field) from None

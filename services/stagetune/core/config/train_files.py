"""The paths config.json names, resolved as SimpleTuner resolves them, and the small files read at load time.

The prompt library and the LyCORIS settings are read now, so a missing or malformed file fails before any
work starts rather than at the first validation or when the adapter is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stagetune.core.config.files import read_json_file
from stagetune.core.config.train_defaults import st_default
from stagetune.core.errors import Collector, ConfigError, NotSupportedError

#: LyCORIS algorithms whose weights train, save, resume and export (diffusers loads each through peft).
LYCORIS_ALGOS = ("lokr", "loha", "locon", "lora")


def resolve_files(fields: dict[str, Any], base: Path, source_path: Path | None, problems: Collector) -> None:
    """Paths in `fields` resolved in place; the LyCORIS settings and the prompt library loaded beside them."""
    fields["output_dir"] = _output_dir(fields.get("output_dir", st_default("output_dir")), base)
    if "data_backend_config" in fields:
        fields["data_backend_config"] = _resolve_path(fields["data_backend_config"], base, source_path)
    if "init_lora" in fields:
        fields["init_lora"] = _resolve_path(fields["init_lora"], base, source_path)
    if fields.get("lora_type") == "lycoris" and fields.get("model_type", st_default("model_type")) == "lora":
        lycoris = _resolve_path(fields.get("lycoris_config", st_default("lycoris_config")), base, source_path)
        fields["lycoris_config"] = lycoris
        with problems.check():
            fields["lycoris"] = _load_lycoris_config(lycoris)
    if "user_prompt_library" in fields:
        library = _resolve_path(fields["user_prompt_library"], base, source_path)
        fields["user_prompt_library"] = library
        with problems.check():
            fields["user_prompts"] = load_user_prompt_library(library)


def _output_dir(value: Any, base: Path) -> Path | str:
    """A URL stays a string (a Path would fold `s3://` into `s3:/`, a local folder named "s3:")."""
    if "://" in str(value):
        return str(value)
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _resolve_path(value: str | Path, base_dir: Path, source_path: Path | None) -> Path:
    """Relative paths resolve against base_dir (SimpleTuner: the directory train.sh runs in).

    When the file is not there but is next to the config (or its parent, for SimpleTuner's "config/…"
    style), that one is used, so a config moved out of SimpleTuner's tree keeps working.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = [base_dir / path]
    if source_path is not None:
        candidates += [source_path.parent / path, source_path.parent.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def load_user_prompt_library(path: Path) -> dict[str, str]:
    """{nickname: prompt} (or {nickname: {"prompt": …}}), as SimpleTuner's PromptLibraryService."""
    key = "user_prompt_library"
    payload = read_json_file(path, what=f"{key}: prompt library file", field=key)
    if not isinstance(payload, dict):
        raise ConfigError(f"{key}: {path} must be a JSON object of nickname -> prompt", field=key)
    prompts: dict[str, str] = {}
    for raw_name, entry in payload.items():
        name = str(raw_name).strip()
        if not name:
            continue
        if isinstance(entry, dict):
            extra = sorted(k for k, v in entry.items() if k != "prompt" and v is not None)
            if extra:
                raise NotSupportedError(
                    f"not supported yet: {key} entry {name!r} in {path} sets {', '.join(extra)}", field=key
                )
            entry = entry.get("prompt")
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{key}: entry {name!r} in {path} must be a non-empty prompt string", field=key)
        prompts[name] = entry
    return prompts


def _load_lycoris_config(path: Path) -> dict[str, Any]:
    """SimpleTuner's lycoris_config: a JSON object (algo, multiplier, linear_dim, linear_alpha, factor, preset)."""
    data = read_json_file(path, what="lycoris_config file", field="lycoris_config")
    if not isinstance(data, dict):
        raise ConfigError(f"lycoris_config {path} must be a JSON object of LyCORIS settings", field="lycoris_config")
    algo = data.get("algo", "lokr")
    if algo not in LYCORIS_ALGOS:
        raise NotSupportedError(f"not supported yet: lycoris_config algo={algo!r} in {path} (stagetune runs "
                                f"{', '.join(LYCORIS_ALGOS)})", field="lycoris_config")
    return data

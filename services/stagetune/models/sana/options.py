"""Sana's own config.json options, read with SimpleTuner's rules (torch-free: checked before training starts).

- `sana_complex_human_instruction`: the instruction put in front of every positive prompt before Gemma encodes
  it. SimpleTuner's default is its long instruction text; a list, a JSON list, a path to a text file or a
  multi-line string become a list of non-empty stripped lines; `null`, `""` or `"None"` turn it off.
- `tokenizer_max_length`: SimpleTuner ignores it for Sana (the prompt is always 300 tokens) and says so.
- `base_model_precision: fp8-quanto` is refused for Sana, as SimpleTuner refuses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.errors import Collector, ConfigError, NotSupportedError

OPTION_KEYS = frozenset({"sana_complex_human_instruction", "tokenizer_max_length"})
KEY = "sana_complex_human_instruction"
#: SimpleTuner fixes Sana's prompt length (it ignores tokenizer_max_length for Sana).
SANA_MAX_SEQUENCE_LENGTH = 300


def normalise_instruction(value: Any) -> list[str] | None:
    """SimpleTuner's normalisation of the complex human instruction, so the same value gives the same text."""
    if value in (None, "", "None"):
        return None
    if isinstance(value, list | tuple):
        lines = [str(entry).strip() for entry in value if entry not in (None, "", "None")]
        return [line for line in lines if line] or None
    if not isinstance(value, str):
        raise ConfigError(f"{KEY} must be a string or a list of strings, not {type(value).__name__}", field=KEY)
    text = value.strip()
    if not text or text == "None":
        return None
    path = Path(text).expanduser()
    if "\n" not in text and len(text) < 4096 and path.is_file():
        return normalise_instruction(path.read_text(encoding="utf-8"))
    if text[0] in "[{":
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{KEY}: not valid JSON ({exc.msg} at line {exc.lineno})", field=KEY) from None
        return normalise_instruction([parsed] if isinstance(parsed, dict) else parsed)
    return [line.strip() for line in text.splitlines() if line.strip()] or [text]


def parse_sana_options(values: Mapping[str, Any], *, context: Mapping[str, Any], problems: Collector,
                       warnings: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {KEY: normalise_instruction(st.OPTIONS[KEY].default)}
    if KEY in values:
        with problems.check():
            options[KEY] = normalise_instruction(values[KEY])
    if "tokenizer_max_length" in values:
        warnings.append(f"tokenizer_max_length is ignored for Sana: its prompts are always {SANA_MAX_SEQUENCE_LENGTH} "
                        "tokens, as in SimpleTuner")
    if context.get("base_model_precision") == "fp8-quanto":
        problems.add(NotSupportedError("base_model_precision=fp8-quanto is not supported for Sana (as in "
                                       "SimpleTuner): use int8-quanto", field="base_model_precision"))
    return options

"""dtype names as configs and protos spell them."""

from __future__ import annotations

import torch

from stagetune.core.errors import ConfigError

_DTYPES = {
    "": torch.float32, "float32": torch.float32, "fp32": torch.float32, "no": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | None) -> torch.dtype:
    try:
        return _DTYPES[(name or "").lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use float32, bfloat16 or float16", field="dtype") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

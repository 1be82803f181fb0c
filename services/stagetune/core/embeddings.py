"""Turning captions into embeddings: shared by the text service and the trainer's on-demand cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def tokenize_captions(encoder: Any, captions: Sequence[str], options: Mapping[str, Any]) -> Any:
    return encoder.tokenize(list(captions), **options)


def encode_captions(encoder: Any, captions: Sequence[str], options: Mapping[str, Any],
                    tokens: Any = None) -> list[dict[str, torch.Tensor]]:
    """One dict of tensors per caption; `tokens` when `tokenize_captions` ran ahead."""
    out = encoder.encode(list(captions), **options, tokens=tokens)
    return [{name: tensor[i].contiguous() for name, tensor in out.items()} for i in range(len(captions))]

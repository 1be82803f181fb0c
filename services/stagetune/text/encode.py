"""Turning captions into embeddings: shared by the text service and the trainer's on-demand cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def encode_captions(encoder: Any, captions: Sequence[str], options: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
    out = encoder.encode(list(captions), **options)
    return [{name: tensor[i].contiguous() for name, tensor in out.items()} for i in range(len(captions))]

"""Token ids padded and truncated to a fixed length, straight from the fast tokenizer's Rust backend.

A caching stage tokenises every caption once per text encoder. transformers' `tokenizer(...)` call wraps
the backend's `encode_batch` in Python bookkeeping (per-token lists, `BatchEncoding`, nested `flatten`)
that cost ~3x the encoding itself here and held the GIL that the encoder thread needs. The backend,
configured as transformers configures it (truncation to `max_length`, padding to `max_length` with the
tokenizer's pad token and sides), gives the same ids (tests/test_fixed_length.py; the SD3 embeddings
are also checked against diffusers' `encode_prompt`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

_configured: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _backend(tokenizer: Any, max_length: int) -> Any | None:
    """A private copy of the backend with this length's truncation and padding, or None (slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        return None
    with _lock:
        by_length = _configured.setdefault(tokenizer, {})
        if max_length not in by_length:
            from tokenizers import Tokenizer

            copy = Tokenizer.from_str(backend.to_str())  # the tokenizer's own backend keeps its settings
            copy.enable_truncation(max_length, stride=0, strategy="longest_first",
                                   direction=tokenizer.truncation_side)
            copy.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                                pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token,
                                length=max_length)
            by_length[max_length] = copy
        return by_length[max_length]


def fixed_length_ids(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` as `tokenizer(texts, padding="max_length", truncation=True, ...)` gives."""
    backend = _backend(tokenizer, max_length)
    if backend is None:
        out = tokenizer(list(texts), padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt")
        return out.input_ids, out.attention_mask
    encodings = backend.encode_batch(list(texts), add_special_tokens=True)
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(encodings), max_length)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(encodings), max_length)
    return torch.from_numpy(ids), torch.from_numpy(mask)


__all__ = ["fixed_length_ids"]

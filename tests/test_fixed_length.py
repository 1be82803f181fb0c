"""Token ids from the fast backend equal transformers' `tokenizer(..., padding="max_length", truncation=True)`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagetune.models.fixed_length import fixed_length_ids
from stagetune.models.sd3.components import load_tokenizers

CAPTIONS = [
    "",
    "a photo of a cat",
    "  Leading and trailing spaces, UPPER case, tabs\tand\nnewlines  ",
    "unicode: café, naïve, Ångström, 東京, emoji 🙂",
    "punctuation!!! ... (brackets) [square] {curly} <angle> 'quotes' \"double\"",
    " ".join(f"word{i}" for i in range(300)),  # far past every max_length: truncated
    "<|endoftext|> special-looking text </s> <pad>",
]


@pytest.mark.parametrize("which", [0, 1, 2], ids=["clip_l", "clip_g", "t5"])
@pytest.mark.parametrize("max_length", [5, 77, 154])
def test_same_ids_and_mask_as_transformers(tiny_sd3_path: Path, which: int, max_length: int) -> None:
    tokenizer = load_tokenizers(str(tiny_sd3_path))[which]
    expected = tokenizer(CAPTIONS, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt")
    ids, mask = fixed_length_ids(tokenizer, CAPTIONS, max_length)
    assert ids.dtype == torch.long and tuple(ids.shape) == (len(CAPTIONS), max_length)
    assert torch.equal(ids, expected.input_ids)
    assert torch.equal(mask, expected.attention_mask)
    # the tokenizer's own backend is left as it was: a later plain call still pads only when asked
    assert len(tokenizer("a cat").input_ids) < max(max_length, 6)


def test_empty_batch(tiny_sd3_path: Path) -> None:
    ids, mask = fixed_length_ids(load_tokenizers(str(tiny_sd3_path))[2], [], 77)
    assert tuple(ids.shape) == (0, 77) and tuple(mask.shape) == (0, 77)

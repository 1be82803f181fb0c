"""Sana prompt encoding for the text service and validation, batched, with honest cache keys.

The maths is diffusers' `SanaPipeline.encode_prompt` as SimpleTuner calls it (`max_sequence_length=300`,
`clean_caption=False`): the prompt is lower-cased and stripped; a complex human instruction (CHI), when set,
is put in front of it and the tokenised length grows to `CHI tokens + 300 − 2`; Gemma-2 sees the whole
padded sequence with its attention mask; then only position 0 (`<bos>`) and the last 299 positions are kept,
states and mask alike. Written out here, tokenisation apart from encoding, so the text stage can tokenise the
next batch while one encodes and needs no transformer or VAE in memory.

The CHI changes every embedding and costs 3–4× the encoder time, so it is part of the cache key (SimpleTuner's
text cache ignores it: changing it silently reuses stale embeddings).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from stagetune.core.errors import ConfigError
from stagetune.models.fingerprint import digest
from stagetune.models.pretrained import PretrainedEncoder
from stagetune.models.sana.components import SanaTextModels, load_text_encoder
from stagetune.models.sana.options import SANA_MAX_SEQUENCE_LENGTH


def chi_text(instruction: Sequence[str] | None) -> str:
    """The instruction lines as the pipeline joins them ("" when there is none)."""
    return "\n".join(instruction or ())


class SanaTextEncoder(PretrainedEncoder):
    """Gemma-2 prompt encoder giving Sana's `prompt_embeds` [B, 300, D] and `prompt_attention_mask` [B, 300]."""

    family = "sana"
    component = "text"

    def __init__(self, loaded: SanaTextModels | None = None, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self._tokenize_lock = threading.Lock()

    @property
    def models(self) -> SanaTextModels:
        return self.model

    def load(self) -> SanaTextModels:
        return load_text_encoder(self.name_or_path, revision=self.revision, dtype=self.dtype, device=self.device,
                                 precision=self.quantisation.get("text_encoder_1", "no_change"))

    def subfolders(self) -> list[str]:
        return ["text_encoder", "tokenizer"]

    def warm(self, **options: Any) -> SanaTextModels:
        models = self.models
        self.tokenize([], **options)
        return models

    def cache_key(self, caption: str, *, complex_human_instruction: Sequence[str] | None = None,
                  max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH) -> str:
        """Caption, encoder fingerprint, prompt length and the CHI text."""
        return digest("sana-text-v1", caption, self.fingerprint, int(max_sequence_length),
                      chi_text(complex_human_instruction))

    def tokenize(self, captions: list[str], *, complex_human_instruction: Sequence[str] | None = None,
                 max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, CHI + max_sequence_length − 2] (or [B, max_sequence_length])."""
        tokenizer = self.models.tokenizer
        prompts = [caption.lower().strip() for caption in captions]
        chi = chi_text(complex_human_instruction)
        with self._tokenize_lock:
            tokenizer.padding_side = "right"
            length = max_sequence_length
            if chi:
                prompts = [chi + prompt for prompt in prompts]
                length = len(tokenizer.encode(chi)) + max_sequence_length - 2
            if not prompts:
                return torch.zeros(0, length, dtype=torch.long), torch.zeros(0, length, dtype=torch.long)
            tokens = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                               add_special_tokens=True, return_tensors="pt")
        return tokens.input_ids, tokens.attention_mask

    @torch.no_grad()
    def encode(self, captions: list[str], *, complex_human_instruction: Sequence[str] | None = None,
               max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH,
               tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ConfigError("captions must be a list of strings", field="captions")
        if tokens is None:
            tokens = self.tokenize(list(captions), complex_human_instruction=complex_human_instruction,
                                   max_sequence_length=max_sequence_length)
        ids, mask = tokens
        encoder = self.models.text_encoder
        states = encoder(ids.to(self.device), attention_mask=mask.to(self.device))[0].to(dtype=encoder.dtype)
        keep = [0, *range(ids.shape[1] - max_sequence_length + 1, ids.shape[1])]
        return {"prompt_embeds": states[:, keep], "prompt_attention_mask": mask[:, keep].to(self.device)}

"""SD3 prompt encoding for the text service and validation, batched and with honest cache keys.

The maths is diffusers' ``StableDiffusion3Pipeline.encode_prompt`` (and SimpleTuner's ``_encode_prompts``):
CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width, followed on the sequence
axis by T5's last hidden state; pooled = both CLIP projections side by side. It is written out here rather
than calling the pipeline so the text service needs no transformer or VAE in memory, and so that
SimpleTuner's ``t5_padding: zero`` (zeroing T5 states past the prompt) can be applied.

SimpleTuner's text-embed cache keys ignore T5's length and padding mode, so changing either silently reuses
stale embeddings; ``cache_key`` includes both (DESIGN.md §2, §6).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from stagetune.core.errors import ConfigError
from stagetune.models.fingerprint import digest
from stagetune.models.fixed_length import fixed_length_ids
from stagetune.models.pretrained import PretrainedEncoder
from stagetune.models.sd3.components import SD3TextModels, load_text_encoders

CLIP_MAX_LENGTH = 77
T5_PADDING_MODES = ("unmodified", "zero")
TEXT_SUBFOLDERS = [
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
]


def check_t5_options(t5_max_length: int, t5_padding: str) -> None:
    """Reject options SimpleTuner would reject, naming its config keys."""
    if t5_padding not in T5_PADDING_MODES:
        raise ConfigError(
            f"t5_padding must be one of {', '.join(T5_PADDING_MODES)}, not {t5_padding!r}", field="t5_padding"
        )
    if not isinstance(t5_max_length, int) or isinstance(t5_max_length, bool) or t5_max_length < 1:
        raise ConfigError(
            f"tokenizer_max_length must be a positive integer, not {t5_max_length!r}",
            field="tokenizer_max_length",
        )


class SD3TextEncoder(PretrainedEncoder):
    """CLIP-L + CLIP-G + T5 prompt encoder producing SD3's ``prompt_embeds`` and ``pooled_prompt_embeds``.

    ``quantisation`` takes SimpleTuner's keys: ``text_encoder_1`` (CLIP-L), ``_2`` (CLIP-G), ``_3`` (T5).
    """

    family = "sd3"
    component = "text"

    def __init__(self, loaded: SD3TextModels | None = None, **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        # Tokenisers are shared by callers of this encoder: one batch at a time.
        self._tokenize_lock = threading.Lock()

    @property
    def models(self) -> SD3TextModels:
        return self.model

    def load(self) -> SD3TextModels:
        """Through the shared component memo, so the embedded services hold one copy of the encoders."""
        return load_text_encoders(self.name_or_path, revision=self.revision, dtype=self.dtype,
                                  device=self.device, quantisation=self.quantisation)

    def subfolders(self) -> list[str]:
        return TEXT_SUBFOLDERS

    def warm(self, t5_max_length: int = 154, **_options: object) -> SD3TextModels:
        """Load the encoders and set up tokenisation at these lengths: set-up, not per-batch, work."""
        models = self.models
        self.tokenize([], t5_max_length)
        return models

    def cache_key(self, caption: str, *, t5_max_length: int = 154, t5_padding: str = "unmodified") -> str:
        """Key of one caption's embeddings: caption, encoder fingerprint, T5 length and T5 padding mode."""
        check_t5_options(t5_max_length, t5_padding)
        return digest("sd3-text-v1", caption, self.fingerprint, t5_max_length, t5_padding)

    def tokenize(self, captions: list[str], t5_max_length: int = 154, **_options: object
                 ) -> tuple[torch.Tensor, ...]:
        """Token ids for `encode(..., tokens=)`: separate so a caching stage can tokenise the next batch
        while this one runs through the encoders."""
        m = self.models
        with self._tokenize_lock:
            clip_l_ids, _ = fixed_length_ids(m.tokenizer, captions, CLIP_MAX_LENGTH)
            clip_g_ids, _ = fixed_length_ids(m.tokenizer_2, captions, CLIP_MAX_LENGTH)
            t5_ids, t5_mask = fixed_length_ids(m.tokenizer_3, captions, t5_max_length)
        return clip_l_ids, clip_g_ids, t5_ids, t5_mask

    @torch.no_grad()
    def encode(
        self,
        captions: list[str],
        *,
        t5_max_length: int = 154,
        t5_padding: str = "unmodified",
        tokens: tuple[torch.Tensor, ...] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch: ``prompt_embeds`` [B, 77 + t5_max_length, T5 width], pooled [B, P].

        Like the pipeline and SimpleTuner, no attention mask is given to T5 (it attends to its padding), so
        ``t5_padding: zero`` only zeroes the padded positions' outputs afterwards.
        """
        check_t5_options(t5_max_length, t5_padding)
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ConfigError("captions must be a list of strings", field="captions")
        m = self.models
        if tokens is None:
            tokens = self.tokenize(list(captions), t5_max_length)
        clip_l_ids, clip_g_ids, t5_ids, t5_mask = tokens

        clip_states, pooled = [], []
        for encoder, ids in ((m.text_encoder, clip_l_ids), (m.text_encoder_2, clip_g_ids)):
            out = encoder(ids.to(self.device), output_hidden_states=True)
            pooled.append(out.text_embeds)
            clip_states.append(out.hidden_states[-2].to(dtype=encoder.dtype))
        clip_embeds = torch.cat(clip_states, dim=-1)
        pooled_embeds = torch.cat(pooled, dim=-1)

        t5_embeds = m.text_encoder_3(t5_ids.to(self.device))[0].to(dtype=m.text_encoder_3.dtype)
        if t5_padding == "zero":
            t5_embeds = t5_embeds * t5_mask.to(device=t5_embeds.device, dtype=t5_embeds.dtype).unsqueeze(-1)

        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
        prompt_embeds = torch.cat([clip_embeds, t5_embeds], dim=-2)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_embeds}

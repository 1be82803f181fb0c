"""SD3 prompt encoding against diffusers' own pipeline, and cache keys that see every option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagetune.core.errors import ConfigError
from stagetune.models.sd3.text import SD3TextEncoder
from stagetune.models.sd3.tiny import TINY_SD3

LONG = ", ".join(f"a small red house number {i} beside a wooden bridge" for i in range(12))
CAPTIONS = ["a photo of a cat", "", LONG, "Zebra! 123 ~tilde~ {braces} 'quotes'"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def encoder(tiny_sd3_path: Path) -> SD3TextEncoder:
    return SD3TextEncoder.from_pretrained(str(tiny_sd3_path))


@pytest.fixture(scope="module")
def pipeline(tiny_sd3_path: Path):  # noqa: ANN201 - diffusers type, imported lazily
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path, transformer=None, vae=None)


def test_long_caption_is_longer_than_clip_context(encoder: SD3TextEncoder) -> None:
    assert len(encoder.models.tokenizer(LONG).input_ids) > 77
    assert len(encoder.models.tokenizer_3(LONG).input_ids) > 154


@pytest.mark.parametrize("length", [154, 77])
def test_embeddings_equal_the_pipeline(encoder: SD3TextEncoder, pipeline, length: int) -> None:  # noqa: ANN001
    ours = encoder.encode(CAPTIONS, t5_max_length=length)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=CAPTIONS,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
    assert negative is None and negative_pooled is None
    assert ours["prompt_embeds"].shape == (len(CAPTIONS), 77 + length, TINY_SD3.t5_d_model)
    assert ours["pooled_prompt_embeds"].shape == (len(CAPTIONS), TINY_SD3.pooled_projection_dim)
    assert embeds.shape == ours["prompt_embeds"].shape
    assert (ours["prompt_embeds"] - embeds).abs().max().item() <= 1e-6
    assert (ours["pooled_prompt_embeds"] - pooled).abs().max().item() <= 1e-6
    # The CLIP rows are zero-padded from 64 to T5's 96 features; the rows differ between captions.
    assert ours["prompt_embeds"][:, :77, 64:].abs().max().item() == 0.0
    assert ours["prompt_embeds"][:, :77, :64].abs().min(dim=-1).values.max().item() > 0
    assert not torch.allclose(ours["prompt_embeds"][0], ours["prompt_embeds"][1])


def test_zero_padding_masks_t5_positions_after_the_prompt(encoder: SD3TextEncoder) -> None:
    plain = encoder.encode(CAPTIONS, t5_max_length=154)["prompt_embeds"]
    zeroed = encoder.encode(CAPTIONS, t5_max_length=154, t5_padding="zero")["prompt_embeds"]
    mask = encoder.models.tokenizer_3(
        CAPTIONS, padding="max_length", max_length=154, truncation=True, return_tensors="pt"
    ).attention_mask.bool()
    assert mask[1].sum() == 1 and mask[2].all()  # the empty caption is just </s>; the long one fills T5
    t5_plain, t5_zeroed = plain[:, 77:], zeroed[:, 77:]
    assert torch.equal(t5_zeroed[mask], t5_plain[mask])
    assert t5_zeroed[~mask].abs().max().item() == 0.0 and t5_plain[~mask].abs().max().item() > 0
    assert torch.equal(zeroed[:, :77], plain[:, :77])


def test_a_caption_does_not_depend_on_its_batch(encoder: SD3TextEncoder) -> None:
    batch = encoder.encode(CAPTIONS, t5_max_length=77)
    alone = encoder.encode([CAPTIONS[3]], t5_max_length=77)
    assert (batch["prompt_embeds"][3] - alone["prompt_embeds"][0]).abs().max().item() <= 1e-6
    assert (batch["pooled_prompt_embeds"][3] - alone["pooled_prompt_embeds"][0]).abs().max().item() <= 1e-6


def test_cache_key_changes_with_every_option(encoder: SD3TextEncoder, tiny_sd3_path: Path) -> None:
    base = encoder.cache_key("a cat", t5_max_length=154, t5_padding="unmodified")
    assert base == encoder.cache_key("a cat")
    others = {
        encoder.cache_key("a dog"),
        encoder.cache_key("a cat", t5_max_length=77),
        encoder.cache_key("a cat", t5_padding="zero"),
        encoder.cache_key(""),
    }
    assert SD3TextEncoder.from_pretrained(str(tiny_sd3_path), dtype=None).fingerprint == encoder.fingerprint
    bf16 = SD3TextEncoder.from_pretrained(str(tiny_sd3_path), dtype=torch.bfloat16)
    assert bf16.models.text_encoder_3.dtype == torch.bfloat16
    assert bf16.fingerprint != encoder.fingerprint
    others.add(bf16.cache_key("a cat"))
    assert base not in others and len(others) == 5
    assert len(base) == 32


def test_bad_options_name_the_key(encoder: SD3TextEncoder) -> None:
    with pytest.raises(ConfigError) as info:
        encoder.encode(["a cat"], t5_padding="mask")
    assert info.value.field == "t5_padding"
    with pytest.raises(ConfigError) as info:
        encoder.cache_key("a cat", t5_max_length=0)
    assert info.value.field == "tokenizer_max_length"


def test_quantised_t5_gives_close_but_other_embeddings_under_another_key(tiny_sd3_path: Path,
                                                                          encoder: SD3TextEncoder) -> None:
    from optimum.quanto.nn import QLinear

    quantised = SD3TextEncoder.from_pretrained(str(tiny_sd3_path), quantisation={"text_encoder_3": "int8-quanto",
                                                                                  "text_encoder_1": "no_change"})
    assert quantised.quantisation == {"text_encoder_3": "int8-quanto"}
    t5 = quantised.models.text_encoder_3
    assert any(isinstance(m, QLinear) for m in t5.modules())
    assert not any(isinstance(m, QLinear) for m in quantised.models.text_encoder.modules())
    assert not any(isinstance(m, QLinear) for m in encoder.models.text_encoder_3.modules())  # the shared one
    full, quant = encoder.encode(CAPTIONS), quantised.encode(CAPTIONS)
    assert torch.equal(full["pooled_prompt_embeds"], quant["pooled_prompt_embeds"])  # CLIP untouched
    t5_full, t5_quant = full["prompt_embeds"][:, 77:], quant["prompt_embeds"][:, 77:]
    assert not torch.equal(t5_full, t5_quant)
    assert (t5_full - t5_quant).abs().max().item() < 0.1 * t5_full.abs().max().item()
    assert quantised.fingerprint != encoder.fingerprint
    assert quantised.cache_key("a cat") != encoder.cache_key("a cat")
    unquantised = SD3TextEncoder.from_pretrained(str(tiny_sd3_path), load=False,
                                                 quantisation={"text_encoder_3": "no_change"})
    assert unquantised.fingerprint == encoder.fingerprint  # full-precision caches keep their keys

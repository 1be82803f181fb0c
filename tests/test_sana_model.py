"""Sana's parts: the tiny model loads in plain diffusers, and our encoders and σ draws give exactly what
SanaPipeline and SimpleTuner compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.errors import Collector, InputError
from stagetune.models.family import get_family
from stagetune.models.sana.options import normalise_instruction

CHI = normalise_instruction(st.OPTIONS["sana_complex_human_instruction"].default)


def test_the_tiny_model_loads_and_samples_in_plain_diffusers(tiny_sana_path: Path) -> None:
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny_sana_path)
    assert pipe.tokenizer("a cat").input_ids[0] == pipe.tokenizer.bos_token_id == 2
    assert pipe.vae.config.latent_channels == 32 and pipe.transformer.config.patch_size == 1
    image = pipe("a cat", height=64, width=96, num_inference_steps=2, use_resolution_binning=False,
                 output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 96)
    record = json.loads((tiny_sana_path / "stagetune_tiny.json").read_text())
    assert record["family"] == "sana" and record["size"] == "tiny"


def test_the_same_seed_builds_the_same_bytes(tmp_path: Path, tiny_sana_path: Path) -> None:
    from stagetune.models.tiny import build_tiny

    again = build_tiny("sana", tmp_path / "again", seed=0)
    for path in sorted(tiny_sana_path.rglob("*.safetensors")):
        assert (again / path.relative_to(tiny_sana_path)).read_bytes() == path.read_bytes(), path
    with pytest.raises(InputError, match="already exists"):
        build_tiny("sana", again)


@pytest.mark.parametrize("instruction", [None, CHI])
def test_prompt_embeddings_equal_the_pipelines(tiny_sana_path: Path, instruction: list[str] | None) -> None:
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(tiny_sana_path)
    encoder = get_family("sana").text_encoder(str(tiny_sana_path))
    captions = ["A Cat on a mat ", "two dogs, running; far away"]
    ours = encoder.encode(captions, complex_human_instruction=instruction)
    embeds, mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=300,
                                            complex_human_instruction=instruction)
    assert ours["prompt_embeds"].shape == (2, 300, 32)
    assert torch.equal(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_attention_mask"], mask)


def test_the_instruction_is_part_of_the_cache_key(tiny_sana_path: Path) -> None:
    encoder = get_family("sana").text_encoder(str(tiny_sana_path))
    plain = encoder.cache_key("a cat", complex_human_instruction=[])
    assert plain != encoder.cache_key("a cat", complex_human_instruction=CHI)
    assert plain != encoder.cache_key("a dog", complex_human_instruction=[])
    assert plain == encoder.cache_key("a cat", complex_human_instruction=None)


def test_latents_are_the_autoencoders_scaled(tiny_sana_path: Path) -> None:
    from diffusers import AutoencoderDC

    encoder = get_family("sana").latent_encoder(str(tiny_sana_path))
    pixels = torch.rand(2, 3, 64, 96) * 2 - 1
    latents = encoder.encode(pixels, seeds=[1, 2])
    vae = AutoencoderDC.from_pretrained(tiny_sana_path, subfolder="vae")
    assert latents.shape == (2, 32, 2, 3) and encoder.downsample == 32
    torch.testing.assert_close(latents, vae.encode(pixels).latent * vae.config.scaling_factor)
    with pytest.raises(InputError, match="multiple of the autoencoder's 32"):
        encoder.encode(torch.zeros(1, 3, 64, 80), seeds=[0])


def test_sigmas_come_from_the_models_table_as_simpletuner_draws_them(tiny_sana_path: Path) -> None:
    import dataclasses

    from diffusers import FlowMatchEulerDiscreteScheduler

    from stagetune.trainer.flow import FlowSchedule, sample_sigmas, timesteps_for

    overrides = get_family("sana").flow_schedule_overrides(str(tiny_sana_path))
    schedule = dataclasses.replace(FlowSchedule(shift=3.0, auto_shift=True), **overrides)
    generators = [torch.Generator().manual_seed(seed) for seed in range(64)]
    sigmas = sample_sigmas(schedule, generators, seq_len=4)
    # SimpleTuner's Sana.sample_flow_sigmas with the same uniform draws
    reference = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sana_path, subfolder="scheduler")
    u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(seed)) for seed in range(64)])
    indices = torch.clamp((u * 1000).long(), max=999)
    assert torch.equal(sigmas, reference.sigmas[indices])
    assert torch.equal(timesteps_for(sigmas), reference.timesteps[indices])
    assert reference.config.shift == 1.0  # Sana's shift option is the sampler's, never the training table's


def test_options_follow_simpletuner(tmp_path: Path) -> None:
    family = get_family("sana")
    problems, warnings = Collector(), []
    options = family.parse_options({"tokenizer_max_length": 77}, context={}, problems=problems, warnings=warnings)
    assert options["sana_complex_human_instruction"] == CHI and len(CHI) > 5
    assert any("tokenizer_max_length is ignored for Sana" in w for w in warnings)
    instruction = tmp_path / "chi.txt"
    instruction.write_text("first line\n\n  second line  \n")
    assert normalise_instruction(str(instruction)) == ["first line", "second line"]
    assert normalise_instruction('["a", "", "b"]') == ["a", "b"]
    assert normalise_instruction("None") is None and normalise_instruction("") is None
    family.parse_options({}, context={"base_model_precision": "fp8-quanto"}, problems=problems, warnings=[])
    assert set(problems.fields()) == {"base_model_precision"}


def test_training_halves_the_cached_latents() -> None:
    latents = torch.randn(2, 32, 2, 2)
    assert torch.equal(get_family("sana").training_latents(latents), latents * 0.5)
    assert get_family("sana").latent_seq_len(latents) == 4


def test_the_sana_example_is_a_full_rank_fine_tune_that_loads(tmp_path: Path) -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.examples import write_example

    config = load_train_config(write_example("sana", tmp_path / "example", steps=4))
    assert (config.model_family, config.model_type, config.use_ema) == ("sana", "full", True)
    assert json.loads((tmp_path / "example" / "model" / "stagetune_tiny.json").read_text())["family"] == "sana"
    assert len(list((tmp_path / "example" / "datasets" / "photos").glob("*.txt"))) >= 8

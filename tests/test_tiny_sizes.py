"""The tiny SD3 model's sizes: `tiny` (tests) is unchanged, `compute` (benchmarks) is a compute-bound MMDiT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from stagetune.cli import build_parser
from stagetune.core.errors import InputError
from stagetune.models.sd3.tiny import COMPUTE_SD3, SIZES, TINY_SD3, build_tiny_sd3, dims_for, transformer_config

#: The tiny transformer's config.json values as they were before sizes existed (tests rely on them).
TINY_TRANSFORMER = {
    "sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
    "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 96, "caption_projection_dim": 32,
    "pooled_projection_dim": 64, "pos_embed_max_size": 96,
}


def test_tiny_is_the_default_and_unchanged() -> None:
    assert dims_for("tiny") is TINY_SD3 == SIZES["tiny"]
    assert transformer_config(TINY_SD3) == TINY_TRANSFORMER


def test_compute_size_is_an_sd3_shaped_6_by_768_mmdit() -> None:
    config = transformer_config(dims_for("compute"))
    assert COMPUTE_SD3 is SIZES["compute"]
    assert config["num_layers"] == 6
    assert config["attention_head_dim"] == 64  # SD3's head width
    assert config["num_attention_heads"] * config["attention_head_dim"] == 768
    assert config["caption_projection_dim"] == 768
    # Only the transformer grows: the encoders and VAE (run once, while caching) are the tiny ones.
    assert {k: v for k, v in vars(COMPUTE_SD3).items() if not k.startswith("transformer_")} == \
        {k: v for k, v in vars(TINY_SD3).items() if not k.startswith("transformer_")}
    assert config["joint_attention_dim"] == TINY_SD3.t5_d_model


def test_compute_size_parameter_count() -> None:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**transformer_config(COMPUTE_SD3))
    assert 100e6 < sum(p.numel() for p in model.parameters()) < 150e6
    assert len(model.transformer_blocks) == 6


def test_unknown_size_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tiny, compute"):
        build_tiny_sd3(tmp_path / "model", size="huge")
    assert not (tmp_path / "model").exists()


def test_cli_sizes_match_and_output_is_positional() -> None:
    parser = build_parser()
    args = parser.parse_args(["tiny-model", "sd3", "--size", "compute", "out"])
    assert (args.size, args.output, args.seed) == ("compute", "out", 0)
    args = parser.parse_args(["tiny-model", "sd3", "--output", "out"])
    assert (args.size, args.output_flag) == ("tiny", "out")
    tiny_parser = parser._subparsers._group_actions[0].choices["tiny-model"]  # noqa: SLF001
    size_action = next(a for a in tiny_parser._actions if a.dest == "size")  # noqa: SLF001
    assert list(size_action.choices) == list(SIZES)


def test_compute_build_loads_as_a_pipeline(tmp_path: Path) -> None:
    """A few seconds: ~123M random parameters written as a diffusers folder, then loaded back."""
    from diffusers import StableDiffusion3Pipeline

    folder = build_tiny_sd3(tmp_path / "compute", size="compute")
    try:
        saved = json.loads((folder / "transformer" / "config.json").read_text())
        assert {k: saved[k] for k in TINY_TRANSFORMER} == transformer_config(COMPUTE_SD3)
        assert json.loads((folder / "stagetune_tiny.json").read_text())["size"] == "compute"
        pipe = StableDiffusion3Pipeline.from_pretrained(folder)
        assert len(pipe.transformer.transformer_blocks) == 6
        assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 768
        assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    finally:
        shutil.rmtree(folder, ignore_errors=True)

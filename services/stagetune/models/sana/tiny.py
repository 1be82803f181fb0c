"""A tiny Sana pipeline with random weights, for tests and benchmarks on machines without weights or GPUs.

It has every part of the real one at toy widths: a linear-attention DiT (`SanaTransformer2DModel`, patch 1),
a deep-compression autoencoder (`AutoencoderDC`: 32 latent channels, ×32 downsampling, scale only), Gemma-2 with
a sentencepiece tokenizer whose piece names are Gemma's, and Sana's flow DPM-Solver scheduler (shift 3). It is
written with ``save_pretrained``, so the services and ``SanaPipeline.from_pretrained`` load it through the
same calls as a hub model.

Sizes (``SIZES``): ``tiny`` (what the tests use; a training step is overhead) and ``compute`` (6 layers × 768,
heads of 32 as in Sana; the same tiny autoencoder and Gemma) for benchmarks whose step measures compute.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stagetune.models.tiny import pick_size, write_model_folder

#: The real DC-AE f32c32's latent scale (no shift) and Sana's sampling shift.
SANA_VAE_SCALING_FACTOR = 0.41407
SANA_SCHEDULER_SHIFT = 3.0


@dataclass(frozen=True)
class TinySanaDims:
    """Widths of the tiny model. Gemma's context is long enough for Sana's complex human instruction
    (hundreds of tokens) plus a 300-token prompt."""

    gemma_hidden: int = 32
    gemma_layers: int = 2
    gemma_heads: int = 2
    gemma_kv_heads: int = 1
    gemma_head_dim: int = 16
    gemma_vocab_size: int = 512
    gemma_max_positions: int = 2048
    transformer_layers: int = 2
    transformer_heads: int = 2
    transformer_head_dim: int = 8
    cross_heads: int = 2
    cross_head_dim: int = 8
    latent_channels: int = 32
    vae_block_out_channels: tuple[int, ...] = (8, 8, 16, 16, 32, 32)  # six levels: ×32

    @property
    def inner_dim(self) -> int:
        return self.transformer_heads * self.transformer_head_dim


TINY_SANA = TinySanaDims()
#: Sana-shaped widths at which a training step is compute-bound on a CPU (heads of 32 as in Sana 600M/1.6B).
COMPUTE_SANA = TinySanaDims(transformer_layers=6, transformer_heads=24, transformer_head_dim=32, cross_heads=12,
                            cross_head_dim=64)
SIZES: dict[str, TinySanaDims] = {"tiny": TINY_SANA, "compute": COMPUTE_SANA}


def dims_for(size: str) -> TinySanaDims:
    return pick_size(SIZES, size)


def transformer_config(dims: TinySanaDims) -> dict[str, object]:
    """The `SanaTransformer2DModel` arguments for these widths."""
    return {
        "in_channels": dims.latent_channels,
        "out_channels": dims.latent_channels,
        "num_attention_heads": dims.transformer_heads,
        "attention_head_dim": dims.transformer_head_dim,
        "num_layers": dims.transformer_layers,
        "num_cross_attention_heads": dims.cross_heads,
        "cross_attention_head_dim": dims.cross_head_dim,
        "cross_attention_dim": dims.inner_dim,
        "caption_channels": dims.gemma_hidden,
        "mlp_ratio": 2.5,
        "sample_size": 32,
        "patch_size": 1,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def build_tiny_sana(output_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny random-weight Sana pipeline in diffusers format to ``output_dir`` and return it.

    Same seed and size, same bytes. Assembled beside ``output_dir`` and renamed into place, so a crashed
    build never leaves a half-written model; ``output_dir`` must not exist or be empty.
    """
    dims = dims_for(size)
    return write_model_folder(Path(output_dir), lambda folder: _build_into(folder, seed=seed, dims=dims, size=size))


def _gemma(dims: TinySanaDims) -> Any:
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(
        vocab_size=dims.gemma_vocab_size, hidden_size=dims.gemma_hidden, intermediate_size=dims.gemma_hidden * 2,
        num_hidden_layers=dims.gemma_layers, num_attention_heads=dims.gemma_heads,
        num_key_value_heads=dims.gemma_kv_heads, head_dim=dims.gemma_head_dim,
        max_position_embeddings=dims.gemma_max_positions, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    ))


def _autoencoder(dims: TinySanaDims) -> Any:
    from diffusers import AutoencoderDC

    levels = len(dims.vae_block_out_channels)
    return AutoencoderDC(
        in_channels=3, latent_channels=dims.latent_channels, attention_head_dim=8,
        encoder_block_types=("ResBlock",) * levels, decoder_block_types=("ResBlock",) * levels,
        encoder_block_out_channels=dims.vae_block_out_channels,
        decoder_block_out_channels=dims.vae_block_out_channels,
        encoder_qkv_multiscales=((),) * levels, decoder_qkv_multiscales=((),) * levels,
        encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=SANA_VAE_SCALING_FACTOR,
    )


def _build_into(folder: Path, *, seed: int, dims: TinySanaDims, size: str) -> None:
    import torch
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from stagetune.models.tokenizers import build_gemma_tokenizer

    with tempfile.TemporaryDirectory(prefix="stagetune-tok-") as scratch:
        tokenizer = build_gemma_tokenizer(Path(scratch) / "gemma", vocab_size=dims.gemma_vocab_size, seed=seed)
    # One seed per component (resizing one leaves the others' weights unchanged); the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + 1)
        text_encoder = _gemma(dims)
        torch.manual_seed(seed * 1000 + 4)
        transformer = SanaTransformer2DModel(**transformer_config(dims))
        torch.manual_seed(seed * 1000 + 5)
        vae = _autoencoder(dims)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=SANA_SCHEDULER_SHIFT)
    pipeline = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae,
                            transformer=transformer, scheduler=scheduler)
    pipeline.save_pretrained(folder, safe_serialization=True)
    record = {"family": "sana", "seed": seed, "size": size, "dims": asdict(dims)}
    (folder / "stagetune_tiny.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                                encoding="utf-8")

"""A tiny SD3 pipeline with random weights, for tests and benchmarks on machines without weights or GPUs.

It has every part of the real one (MMDiT, 16-channel VAE with SD3's shift and scale and ×8
downsampling, CLIP-L, CLIP-G with its "!" padding, T5, flow-match scheduler with shift 3) at toy widths,
and it is written with ``save_pretrained`` so that services load it through the same ``from_pretrained``
calls as a hub model.

Two sizes (``SIZES``):
- ``tiny``: toy widths everywhere (~80k transformer parameters); what the tests use. A training step is
  overhead, not compute.
- ``compute``: the same tiny VAE and text encoders (they only run while caching), and an MMDiT of 6 layers
  × 768 wide (12 heads of 64, as in SD3) with ~123M parameters. Trained at 256 px with batch 2, one LoRA step
  takes about a second on 2 CPU cores, so benchmarks of training steps measure compute rather than overhead.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stagetune.models.tiny import pick_size, write_model_folder

# Real SD3 values: the VAE's latent normalisation and the scheduler's static shift.
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_VAE_SCALING_FACTOR = 1.5305
SD3_SCHEDULER_SHIFT = 3.0


@dataclass(frozen=True)
class TinySD3Dims:
    """Widths of the tiny model; the relations between them mirror the real model's.

    CLIP-L + CLIP-G hidden widths (64) are narrower than T5's (96), as 768 + 1280 < 4096 in SD3, so the
    zero-padding of CLIP states to T5's width is exercised; pooled = both CLIP projections (64).
    """

    clip_l_hidden: int = 32
    clip_l_projection: int = 32
    clip_g_hidden: int = 32
    clip_g_projection: int = 32
    clip_layers: int = 2
    clip_heads: int = 4
    t5_d_model: int = 96
    t5_vocab_size: int = 512
    t5_layers: int = 2
    t5_heads: int = 4
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_head_dim: int = 8
    latent_channels: int = 16
    vae_block_out_channels: tuple[int, ...] = (16, 16, 32, 32)

    @property
    def pooled_projection_dim(self) -> int:
        return self.clip_l_projection + self.clip_g_projection


TINY_SD3 = TinySD3Dims()

#: SD3-shaped widths at which a training step is compute-bound on a CPU: 6 MMDiT layers × 768
#: (12 heads × 64, SD3's head width). The encoders and VAE stay tiny: they only run while caching.
COMPUTE_SD3 = TinySD3Dims(transformer_layers=6, transformer_heads=12, transformer_head_dim=64)

#: The sizes `build_tiny_sd3` and `stagetune tiny-model sd3 --size` know.
SIZES: dict[str, TinySD3Dims] = {"tiny": TINY_SD3, "compute": COMPUTE_SD3}


def dims_for(size: str) -> TinySD3Dims:
    return pick_size(SIZES, size)


def transformer_config(dims: TinySD3Dims) -> dict[str, object]:
    """The `SD3Transformer2DModel` arguments for these widths (what its `config.json` holds)."""
    return {
        "sample_size": 32,
        "patch_size": 2,
        "in_channels": dims.latent_channels,
        "out_channels": dims.latent_channels,
        "num_layers": dims.transformer_layers,
        "attention_head_dim": dims.transformer_head_dim,
        "num_attention_heads": dims.transformer_heads,
        "joint_attention_dim": dims.t5_d_model,
        "caption_projection_dim": dims.transformer_heads * dims.transformer_head_dim,
        "pooled_projection_dim": dims.pooled_projection_dim,
        "pos_embed_max_size": 96,
    }


#: Where a model folder may hold its own preview decoder (the tiny model does; real ones use the hub's).
PREVIEW_FOLDER = "taesd3"


def build_tiny_sd3(output_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny random-weight SD3 pipeline in diffusers format to ``output_dir`` and return it.

    ``size`` is one of `SIZES`: ``tiny`` (the default, what the tests use) or ``compute``. The same seed and
    size give byte-identical files, so tests and benchmarks can compare fingerprints and outputs
    across runs. The folder is assembled beside ``output_dir`` and renamed into place, so a crashed build
    never leaves a half-written model that loads; ``output_dir`` must not exist or be empty.
    """
    dims = dims_for(size)
    return write_model_folder(Path(output_dir), lambda folder: _build_into(folder, seed=seed, dims=dims, size=size))


def _text_encoders(dims: TinySD3Dims, seeded: Any) -> tuple[Any, Any, Any]:
    """CLIP-L, CLIP-G and T5 in SD3's shapes, scaled down (seeds 1–3)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from stagetune.models.tokenizers import CLIP_VOCAB_SIZE

    def clip(hidden: int, projection: int, act: str) -> Any:
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            projection_dim=projection,
            num_hidden_layers=dims.clip_layers,
            num_attention_heads=dims.clip_heads,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
        return CLIPTextModelWithProjection(config)

    seeded(1)
    text_encoder = clip(dims.clip_l_hidden, dims.clip_l_projection, "quick_gelu")
    seeded(2)
    text_encoder_2 = clip(dims.clip_g_hidden, dims.clip_g_projection, "gelu")
    seeded(3)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=dims.t5_vocab_size, d_model=dims.t5_d_model, d_kv=16, d_ff=dims.t5_d_model * 2,
        num_layers=dims.t5_layers, num_heads=dims.t5_heads, relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    ))
    return text_encoder, text_encoder_2, text_encoder_3


def _autoencoders(dims: TinySD3Dims, seeded: Any) -> tuple[Any, Any]:
    """The VAE (seed 5) and a preview decoder in taesd3's shape (seed 6): ×8 upsampling of 16 channels."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    seeded(5)
    blocks = len(dims.vae_block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=dims.vae_block_out_channels,
        layers_per_block=1,
        latent_channels=dims.latent_channels,
        norm_num_groups=8,
        sample_size=64,
        shift_factor=SD3_VAE_SHIFT_FACTOR,
        scaling_factor=SD3_VAE_SCALING_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    seeded(6)
    preview = AutoencoderTiny(
        in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16), latent_channels=dims.latent_channels,
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), upsampling_scaling_factor=2,
    )
    return vae, preview


def _build_into(folder: Path, *, seed: int, dims: TinySD3Dims, size: str) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from stagetune.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    with tempfile.TemporaryDirectory(prefix="stagetune-tok-") as scratch:
        tokenizer = build_clip_tokenizer(Path(scratch) / "clip_l")
        tokenizer_2 = build_clip_tokenizer(Path(scratch) / "clip_g", pad_token="!")
        tokenizer_3 = build_t5_tokenizer(Path(scratch) / "t5", vocab_size=dims.t5_vocab_size, seed=seed)

    # Each component draws from its own seed, so resizing one leaves the others' weights unchanged; the
    # global RNG is forked so that building a model does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):

        def seeded(offset: int) -> None:
            torch.manual_seed(seed * 1000 + offset)

        text_encoder, text_encoder_2, text_encoder_3 = _text_encoders(dims, seeded)
        seeded(4)
        transformer = SD3Transformer2DModel(**transformer_config(dims))
        vae, preview = _autoencoders(dims, seeded)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SD3_SCHEDULER_SHIFT)

    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    preview.save_pretrained(folder / PREVIEW_FOLDER, safe_serialization=True)
    record: dict[str, object] = {"family": "sd3", "seed": seed, "dims": asdict(dims)}
    if size != "tiny":  # the tiny model's record stays as it always was (byte-identical builds)
        record["size"] = size
    (folder / "stagetune_tiny.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n",
                                                encoding="utf-8")

"""The training step computes what diffusers' own SD3 training (and SimpleTuner's Sana training) computes.

On a fixed batch, seed and the tiny model, the loss and every trained parameter's gradient from
stagetune's pieces (the family's collate and transformer inputs, the flow-matching input and target, the
adapter) equal a reference written directly from diffusers components in the way diffusers'
train_dreambooth_lora_sd3.py writes it, within 1e-5 relative, for LoRA and for full-rank training. For Sana the
reference is SimpleTuner's Sana step: latents halved, the transformer given the prompt's attention mask.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import SanaTransformer2DModel, SD3Transformer2DModel
from peft import LoraConfig

from stagetune.models.family import get_family
from stagetune.trainer.adapters import make_adapter
from stagetune.trainer.flow import noisy_input, timesteps_for


def _batch(config: object) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return {
        "latents": torch.randn(2, config.in_channels, 8, 8, generator=generator),
        "noise": torch.randn(2, config.in_channels, 8, 8, generator=generator),
        "sigmas": torch.tensor([0.3, 0.8]),
        "prompt_embeds": torch.randn(2, 20, config.joint_attention_dim, generator=generator),
        "pooled": torch.randn(2, config.pooled_projection_dim, generator=generator),
    }


def _randomise(params: list[torch.nn.Parameter]) -> None:
    """Give every trained tensor the same random values in both models (LoRA's B starts at zero)."""
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for param in params:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _trainable(name: str, model_path: Path, model_type: str) -> tuple[Any, Any, list]:
    """(family, transformer with our adapter attached, its trained parameters by name), randomised."""
    family = get_family(name)
    cfg = SimpleNamespace(model_type=model_type, lora_type="standard", lora_rank=4, lora_alpha=4, lora_dropout=0.0,
                          lora_init_type="default", init_lora=None, family_options={}, lycoris={})
    model = family.load_transformer(str(model_path))
    params = make_adapter(cfg, family, family.pipeline_class()).attach(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len(named)
    _randomise([p for _, p in named])
    return family, model, named


def _ours(model_path: Path, model_type: str) -> tuple[float, dict[str, torch.Tensor]]:
    family, model, named = _trainable("sd3", model_path, model_type)
    batch = _batch(model.config)
    text = family.collate_text([{"prompt_embeds": e, "pooled_prompt_embeds": p}
                                for e, p in zip(batch["prompt_embeds"], batch["pooled"], strict=True)],
                               {}, [False, False])
    noisy, target = noisy_input(batch["latents"], batch["noise"], batch["sigmas"])
    pred = model(**family.transformer_inputs(noisy, timesteps_for(batch["sigmas"]), text))[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in named}


def _reference_trainable(cls: Any, model_path: Path, model_type: str) -> tuple[Any, list]:
    """The plain diffusers transformer with peft's LoRA (diffusers' own way) or all weights trainable."""
    transformer = cls.from_pretrained(model_path, subfolder="transformer")
    if model_type == "lora":
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True,
                                           target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    else:
        transformer.requires_grad_(True)
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    _randomise([p for _, p in named])
    return transformer, named


def _reference(model_path: Path, model_type: str) -> tuple[float, dict[str, torch.Tensor]]:
    transformer, named = _reference_trainable(SD3Transformer2DModel, model_path, model_type)
    batch = _batch(transformer.config)
    sigmas = batch["sigmas"].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * batch["latents"] + sigmas * batch["noise"]
    model_pred = transformer(hidden_states=noisy_model_input, timestep=batch["sigmas"] * 1000,
                             encoder_hidden_states=batch["prompt_embeds"], pooled_projections=batch["pooled"],
                             return_dict=False)[0]
    target = batch["noise"] - batch["latents"]
    loss = torch.mean(((model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in named}


def _assert_equal(ours: tuple[float, dict[str, torch.Tensor]], ref: tuple[float, dict[str, torch.Tensor]]) -> None:
    """Loss within 1e-5 relative; each gradient within 1e-5 of the reference's largest entry."""
    (loss, grads), (ref_loss, ref_grads) = ours, ref
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        reference = ref_grads[name]
        scale = reference.abs().max().clamp_min(1e-12)
        assert ((grad - reference).abs().max() / scale) < 1e-5, name
    assert any(g.abs().max() > 0 for g in grads.values())


@pytest.mark.parametrize("model_type", ["lora", "full"])
def test_loss_and_gradients_equal_diffusers_reference(tiny_sd3_path: Path, model_type: str) -> None:
    _assert_equal(_ours(tiny_sd3_path, model_type), _reference(tiny_sd3_path, model_type))


def _sana_batch(config: object) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(4321)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # a shorter prompt: padding the transformer must ignore
    return {
        "latents": torch.randn(2, config.in_channels, 4, 6, generator=generator),
        "noise": torch.randn(2, config.in_channels, 4, 6, generator=generator),
        "sigmas": torch.tensor([0.25, 0.901]),
        "prompt_embeds": torch.randn(2, 12, config.caption_channels, generator=generator),
        "mask": mask,
    }


def _sana_ours(model_path: Path, model_type: str) -> tuple[float, dict[str, torch.Tensor]]:
    family, model, named = _trainable("sana", model_path, model_type)
    batch = _sana_batch(model.config)
    text = family.collate_text([{"prompt_embeds": e, "prompt_attention_mask": m}
                                for e, m in zip(batch["prompt_embeds"], batch["mask"], strict=True)], {}, [False] * 2)
    noisy, target = noisy_input(family.training_latents(batch["latents"]), batch["noise"], batch["sigmas"])
    pred = model(**family.transformer_inputs(noisy, timesteps_for(batch["sigmas"]), text))[0]
    loss = torch.nn.functional.mse_loss(pred.float(), target.float())
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in named}


def _sana_reference(model_path: Path, model_type: str) -> tuple[float, dict[str, torch.Tensor]]:
    transformer, named = _reference_trainable(SanaTransformer2DModel, model_path, model_type)
    batch = _sana_batch(transformer.config)
    latents = batch["latents"] * 0.5  # SimpleTuner's Sana.LATENT_RESCALE
    sigmas = batch["sigmas"].view(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * latents + sigmas * batch["noise"]
    model_pred = transformer(hidden_states=noisy_model_input, timestep=batch["sigmas"] * 1000,
                             encoder_hidden_states=batch["prompt_embeds"], encoder_attention_mask=batch["mask"],
                             return_dict=False)[0]
    target = batch["noise"] - latents
    loss = ((model_pred.float() - target.float()) ** 2).mean(dim=[1, 2, 3]).mean()
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in named}


@pytest.mark.parametrize("model_type", ["full", "lora"])
def test_sana_loss_and_gradients_equal_simpletuners_step(tiny_sana_path: Path, model_type: str) -> None:
    _assert_equal(_sana_ours(tiny_sana_path, model_type), _sana_reference(tiny_sana_path, model_type))

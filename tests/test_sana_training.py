"""Sana full-rank (and LoRA) through the five services: the output is a pipeline folder plain diffusers loads,
validation samples with SanaPipeline (EMA too), and resuming gives the uninterrupted run's weights bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_end_to_end import make_dataset, train_embedded, write_configs

SANA_FULL = {"model_family": "sana", "model_type": "full", "learning_rate": 1e-3, "use_ema": True,
             "ema_decay": 0.9, "ema_validation": "comparison", "gradient_checkpointing": True,
             "optimizer": "optimi-adamw", "tokenizer_max_length": None}


def sana_configs(root: Path, model: Path, *, steps: int, validation: bool = False, **extra: object) -> Path:
    config = write_configs(root, model, steps=steps, validation=validation, **{**SANA_FULL, **extra})
    values = {k: v for k, v in json.loads(config.read_text()).items() if v is not None and k != "lora_rank"}
    config.write_text(json.dumps(values, indent=2))
    return config


def test_full_rank_output_is_a_pipeline_folder_with_ema(tmp_path: Path, tiny_sana_path: Path) -> None:
    from diffusers import SanaPipeline, SanaTransformer2DModel

    make_dataset(tmp_path / "data")
    config = sana_configs(tmp_path, tiny_sana_path, steps=4, validation=True)
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["steps"] == "4"
    output = tmp_path / "output"
    pipe = SanaPipeline.from_pretrained(output)
    base = SanaTransformer2DModel.from_pretrained(tiny_sana_path, subfolder="transformer").state_dict()
    trained = load_file(output / "transformer" / "diffusion_pytorch_model.safetensors")
    ema = load_file(output / "ema" / "transformer" / "diffusion_pytorch_model.safetensors")
    loaded = pipe.transformer.state_dict()
    assert trained.keys() == base.keys() == ema.keys()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    changed = [k for k in trained if not torch.equal(trained[k], base[k])]
    assert len(changed) > len(trained) // 2, "full-rank training changes (nearly) every tensor"
    assert any(not torch.equal(ema[k], trained[k]) for k in changed), "EMA weights are their own average"
    SanaPipeline.from_pretrained(output / "ema")  # the averaged weights load the same way
    checkpoint = SanaTransformer2DModel.from_pretrained(output / "checkpoint-4", subfolder="transformer")
    assert all(torch.equal(checkpoint.state_dict()[k], trained[k]) for k in trained)
    images = sorted(p.name for p in (output / "validation_images").rglob("*.png"))
    assert any("ema" in name for name in images) and any("ema" not in name for name in images), images


def test_resuming_gives_the_uninterrupted_weights_bit_for_bit(tmp_path: Path, tiny_sana_path: Path) -> None:
    make_dataset(tmp_path / "data")
    straight_root, resumed_root = tmp_path / "straight", tmp_path / "resumed"
    for root in (straight_root, resumed_root):
        root.mkdir()
    data = {"data_backend_config": str(tmp_path / "multidatabackend.json")}
    sana_configs(tmp_path, tiny_sana_path, steps=6)  # writes the shared multidatabackend.json
    train_embedded(sana_configs(straight_root, tiny_sana_path, steps=6, **data), str(tmp_path / "store"))
    # the same run stopped after step 4 (its last checkpoint), then continued to 6 by a new run
    train_embedded(sana_configs(resumed_root, tiny_sana_path, steps=4, **data), str(tmp_path / "store"))
    run = train_embedded(sana_configs(resumed_root, tiny_sana_path, steps=6, **data), str(tmp_path / "store"))
    assert run.phase("trainer").outputs["steps_trained"] == "2"
    for part in ("transformer", "ema/transformer"):
        straight = load_file(straight_root / "output" / part / "diffusion_pytorch_model.safetensors")
        resumed = load_file(resumed_root / "output" / part / "diffusion_pytorch_model.safetensors")
        assert straight.keys() == resumed.keys()
        for key in straight:
            assert torch.equal(straight[key], resumed[key]), f"{part}: {key} differs after resume"


def test_lora_on_sana_loads_with_load_lora_weights(tmp_path: Path, tiny_sana_path: Path) -> None:
    from diffusers import SanaPipeline
    from peft import get_peft_model_state_dict

    make_dataset(tmp_path / "data")
    config = sana_configs(tmp_path, tiny_sana_path, steps=2, model_type="lora", lora_rank=4, use_ema=False,
                          gradient_checkpointing=False)
    train_embedded(config, str(tmp_path / "store"))
    lora = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    saved = load_file(lora)
    assert saved and all("lora" in key for key in saved)
    pipe = SanaPipeline.from_pretrained(tiny_sana_path)
    pipe.load_lora_weights(str(lora.parent))
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    assert set(loaded) == {k.removeprefix("transformer.") for k in saved}, "every saved tensor is loaded"
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.removeprefix("transformer.")], tensor), key
    assert any(tensor.abs().max() > 0 for key, tensor in saved.items() if "lora_B" in key), "the LoRA trained"


def test_lycoris_lokr_on_sana_exports_what_lycoris_merges(tmp_path: Path, tiny_sana_path: Path) -> None:
    from diffusers import SanaTransformer2DModel
    from lycoris import create_lycoris_from_weights

    make_dataset(tmp_path / "data")
    (tmp_path / "lycoris_config.json").write_text(json.dumps(
        {"algo": "lokr", "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "factor": 4,
         "apply_preset": {"target_module": ["Attention"]}}))
    config = sana_configs(tmp_path, tiny_sana_path, steps=2, model_type="lora", lora_type="lycoris",
                          lycoris_config=str(tmp_path / "lycoris_config.json"), use_ema=False)
    train_embedded(config, str(tmp_path / "store"))
    weights = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    assert all(key.startswith("lycoris_") for key in load_file(weights))

    def load() -> SanaTransformer2DModel:
        return SanaTransformer2DModel.from_pretrained(tiny_sana_path, subfolder="transformer")

    merged = load()
    network, _ = create_lycoris_from_weights(1.0, str(weights), merged)
    network.merge_to()
    plain = load()
    plain.load_lora_adapter(load_file(weights.with_name("pytorch_lora_weights.diffusers.safetensors")), prefix=None,
                            adapter_name="trained")
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 32, 2, 2, generator=generator), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator), "return_dict": False}
    with torch.no_grad():
        base, ours, theirs = (model(**inputs)[0] for model in (load(), plain, merged))
    assert (ours - base).abs().max() > 1e-6
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)

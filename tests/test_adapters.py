"""LoRA, LyCORIS and full-rank training behind one adapter interface, through the five services.

Each trains, resumes to the same weights as a run that never stopped, validates, and exports what its
users load: LyCORIS as SimpleTuner saves it and as diffusers' load_lora_adapter reads it, full-rank as a
pipeline folder that from_pretrained loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_end_to_end import make_dataset, train_embedded
from test_trainer_options import _configs

LORA = "pytorch_lora_weights.safetensors"


def _straight_and_resumed(tmp_path: Path, model: Path, **extra: object) -> tuple[Path, Path]:
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    train_embedded(_configs(tmp_path, model, tmp_path / "data", 4, "straight", **extra), store)
    train_embedded(_configs(tmp_path, model, tmp_path / "data", 2, "resumed", **extra), store)
    extended = train_embedded(_configs(tmp_path, model, tmp_path / "data", 4, "resumed", **extra), store)
    assert extended.phase("trainer").outputs["steps_trained"] == "2"
    return tmp_path / "straight", tmp_path / "resumed"


def _same_files(a: Path, b: Path, name: str) -> dict[str, torch.Tensor]:
    left, right = load_file(a / name), load_file(b / name)
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key
    return left


def _forward(transformer: torch.nn.Module) -> torch.Tensor:
    config = transformer.config
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return transformer(hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=generator),
                           timestep=torch.tensor([300.0]),
                           encoder_hidden_states=torch.randn(1, 12, config.joint_attention_dim, generator=generator),
                           pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                           return_dict=False)[0]


@pytest.mark.parametrize("algo", ["lokr", "loha", "locon"])
def test_lycoris_trains_resumes_and_exports_for_simpletuner_and_diffusers(tmp_path: Path, tiny_sd3_path: Path,
                                                                         algo: str) -> None:
    from lycoris import create_lycoris_from_weights

    from stagetune.models.sd3.components import load_transformer

    settings = {"algo": algo, "multiplier": 1.0, "linear_dim": 4, "linear_alpha": 2, "factor": 4,
                "apply_preset": {"target_module": ["Attention"]}}
    (tmp_path / "lycoris_config.json").write_text(json.dumps(settings))
    straight, resumed = _straight_and_resumed(tmp_path, tiny_sd3_path, optimizer="adamw", mixed_precision="no",
                                              lora_type="lycoris",
                                              lycoris_config=str(tmp_path / "lycoris_config.json"))
    weights = _same_files(straight, resumed, LORA)  # resume is exact
    assert weights and all(key.startswith("lycoris_") for key in weights)  # LyCORIS' own names, as SimpleTuner
    with safe_open(str(straight / LORA), framework="pt") as handle:
        assert json.loads(handle.metadata()["lycoris_config"])["algo"] == algo

    if algo == "loha":  # diffusers 0.42 cannot load LoHa: no export; validation samples the merged weights
        assert not (straight / "pytorch_lora_weights.diffusers.safetensors").exists()
        return
    # diffusers loads the export into the plain transformer; it equals LyCORIS' own merge
    merged = load_transformer(str(tiny_sd3_path))
    network, _ = create_lycoris_from_weights(1.0, str(straight / LORA), merged)
    network.merge_to()
    plain = load_transformer(str(tiny_sd3_path))
    plain.load_lora_adapter(load_file(straight / "pytorch_lora_weights.diffusers.safetensors"), prefix=None,
                            adapter_name="trained")
    base = _forward(load_transformer(str(tiny_sd3_path)))
    ours, theirs = _forward(plain), _forward(merged)
    assert (ours - base).abs().max() > 1e-6  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_lycoris_config_that_is_missing_or_wrong_is_named(tmp_path: Path) -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import ConfigError, NotSupportedError

    base = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 2,
            "lora_type": "lycoris"}
    with pytest.raises(ConfigError, match="lycoris_config file not found") as info:
        load_train_config({**base, "lycoris_config": str(tmp_path / "absent.json")})
    assert info.value.field == "lycoris_config"
    (tmp_path / "odd.json").write_text('{"algo": "glora"}')
    with pytest.raises(NotSupportedError, match="glora"):
        load_train_config({**base, "lycoris_config": str(tmp_path / "odd.json")})


def test_full_rank_trains_resumes_and_saves_a_pipeline(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    straight, resumed = _straight_and_resumed(tmp_path, tiny_sd3_path, model_type="full", optimizer="adamw",
                                              mixed_precision="no", learning_rate=1e-3)
    trained = _same_files(straight / "transformer", resumed / "transformer", "diffusion_pytorch_model.safetensors")
    pipe = StableDiffusion3Pipeline.from_pretrained(straight)  # the output_dir is a pipeline folder
    for name, tensor in pipe.transformer.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path).transformer.state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in trained)  # the weights moved
    original = copy.deepcopy(pipe.vae.state_dict())
    assert all(torch.equal(v, original[k]) for k, v in
               StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path).vae.state_dict().items())


def test_full_rank_validation_samples_the_trained_transformer(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from test_end_to_end import write_configs

    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, model_type="full", optimizer="adamw",
                           learning_rate=1e-3)
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["validation_images"] == "1"
    assert (tmp_path / "output" / "validation_images" / "step_2_validation_64x64.png").exists()


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_validation_samples_the_trained_network(tmp_path: Path, tiny_sd3_path: Path, algo: str) -> None:
    from test_end_to_end import write_configs

    make_dataset(tmp_path / "data")
    (tmp_path / "lycoris_config.json").write_text(json.dumps({"algo": algo, "linear_dim": 4, "linear_alpha": 4,
                                                              "factor": 4}))
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, optimizer="adamw", lora_type="lycoris",
                           lycoris_config=str(tmp_path / "lycoris_config.json"))
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["validation_images"] == "1"

"""SimpleTuner's optimizer and schedule options through the whole pipeline: an unchanged config trains with
SimpleTuner's defaults (adamw_bf16, constant_with_warmup, clipping by value at 2.0), and a run stopped at a
checkpoint and extended gives the same weights, bit for bit, as one that never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from test_end_to_end import make_dataset, train_embedded, write_configs

LORA = "pytorch_lora_weights.safetensors"


def _configs(root: Path, model: Path, data: Path, steps: int, output: str, **extra: object) -> Path:
    config = write_configs(root, model, steps=steps, validation=False, output_dir=str(root / output),
                           data_backend_config=str(root / "multidatabackend.json"), **extra)
    raw = json.loads(config.read_text())
    for key in ("optimizer", "lr_scheduler", "mixed_precision"):  # SimpleTuner's defaults, unless given
        if key not in extra:
            raw.pop(key, None)
    raw["checkpointing_steps"] = 2
    config.write_text(json.dumps(raw))
    backends = json.loads((root / "multidatabackend.json").read_text())
    backends[0]["instance_data_dir"] = str(data)
    (root / "multidatabackend.json").write_text(json.dumps(backends))
    return config


@pytest.mark.parametrize("extra", [{}, {"optimizer": "prodigy", "learning_rate": 1.0, "mixed_precision": "no"}],
                         ids=["simpletuner-defaults", "prodigy"])
def test_stopped_and_extended_equals_straight(tmp_path: Path, tiny_sd3_path: Path, extra: dict) -> None:
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    straight = train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 4, "straight", **extra), store)
    assert straight.phase("trainer").outputs["steps_trained"] == "4"
    raw = json.loads((tmp_path / "config.json").read_text())
    if not extra:
        assert "optimizer" not in raw and "lr_scheduler" not in raw  # the user's config leaves them out
    train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 2, "stopped", **extra), store)
    extended = train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 4, "stopped", **extra), store)
    assert extended.phase("trainer").outputs["steps_trained"] == "2"
    assert extended.changed_settings == ["max_train_steps: 2 → 4"]
    a = load_safetensors((tmp_path / "straight" / LORA).read_bytes())
    b = load_safetensors((tmp_path / "stopped" / LORA).read_bytes())
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if not extra:  # adamw_bf16 trains and saves the adapter in bfloat16, as SimpleTuner does
        assert {t.dtype for t in a.values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------------------- quantised bases


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-quanto"])
def test_lora_on_a_quantised_base_loads_into_the_plain_model(tmp_path: Path, tiny_sd3_path: Path,
                                                             precision: str) -> None:
    from diffusers import StableDiffusion3Pipeline
    from peft import get_peft_model_state_dict

    make_dataset(tmp_path / "data")
    config = _configs(tmp_path, tiny_sd3_path, tmp_path / "data", 2, "out", optimizer="adamw",
                      base_model_precision=precision)
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["steps_trained"] == "2"
    saved = load_safetensors((tmp_path / "out" / LORA).read_bytes())
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)  # float32, not quantised
    pipe.load_lora_weights(str(tmp_path / "out"))
    (adapter,) = pipe.transformer.peft_config
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    expected = {k.removeprefix("transformer."): v for k, v in saved.items()}
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor.to(loaded[key].dtype)), key


def test_precisions_that_cannot_run_here_are_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import NotSupportedError, PreconditionError
    from stagetune.models import quantise

    with pytest.raises(PreconditionError, match="needs a CUDA GPU") as info:
        quantise.check_precision("nf4-bnb", "base_model_precision", cuda=False)
    assert info.value.field == "base_model_precision"
    monkeypatch.setattr(quantise.shutil, "which", lambda name: None)
    base = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 2}
    with pytest.raises(PreconditionError, match="no C\\+\\+ compiler"):
        load_train_config({**base, "base_model_precision": "int4-quanto"})
    with pytest.raises(NotSupportedError, match="int8-torchao"):
        load_train_config({**base, "base_model_precision": "int8-torchao"})

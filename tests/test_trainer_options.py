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


def test_quantised_text_encoder_caches_apart_and_validation_uses_it(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from optimum.quanto.nn import QLinear

    from stagetune.models.family import get_family
    from stagetune.validation.sampling import get_pipeline

    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    full = train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 1, "full", optimizer="adamw"), store)
    quantised = train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 1, "quantised",
                                        optimizer="adamw", text_encoder_3_precision="int8-quanto"), store)
    assert quantised.phase("trainer").outputs["steps_trained"] == "1"
    prefix = [run.phase("text").outputs["cache_prefix"] for run in (full, quantised)]
    assert prefix[0] != prefix[1]  # other embeddings, other cache: never mixed with full-precision ones
    assert int(quantised.phase("text").outputs["encoded"]) > 0
    pipe = get_pipeline(get_family("sd3"), str(tiny_sd3_path), None, torch.float32, {"text_encoder_3": "int8-quanto"})
    assert any(isinstance(m, QLinear) for m in pipe.text_encoder_3.modules())
    assert not any(isinstance(m, QLinear) for m in pipe.transformer.modules())


def test_text_encoder_precisions_are_checked_per_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import Collector, ConfigError, PreconditionError
    from stagetune.core.requests import model_ref
    from stagetune.models import quantise
    from stagetune.v1 import common_pb2

    base = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 2}
    cfg = load_train_config({**base, "text_encoder_4_precision": "int8-quanto",
                             "text_encoder_1_precision": "fp8-quanto"})
    assert cfg.text_encoder_quantisation() == {"text_encoder_1": "fp8-quanto"}
    assert any("text_encoder_4_precision=int8-quanto changes nothing: sd3 has 3" in w for w in cfg.warnings)
    with pytest.raises(ConfigError, match="did you mean 'int8-quanto'"):
        load_train_config({**base, "text_encoder_2_precision": "int9-quanto"})
    monkeypatch.setattr(quantise.shutil, "which", lambda name: None)
    with pytest.raises(PreconditionError, match="no C\\+\\+ compiler") as info:
        load_train_config({**base, "text_encoder_3_precision": "int4-quanto"})
    assert info.value.field == "text_encoder_3_precision"
    problems = Collector()
    model_ref(problems, common_pb2.ModelRef(name_or_path="", family="sd3",
                                            quantisation={"text_encoder_9": "int8-quanto", "text_encoder_1": "int7"}))
    fields = {p.field for p in problems.problems}
    assert {"model.quantisation.text_encoder_9", "model.quantisation.text_encoder_1"} <= fields


# --------------------------------------------------------------------------------- EMA, checkpointing interval


def test_ema_is_saved_validated_and_resumed(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    ema = {"optimizer": "adamw", "use_ema": True, "ema_decay": 0.5, "ema_validation": "comparison",
           "mixed_precision": "no"}
    straight = train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 4, "straight", **ema), store)
    assert straight.phase("trainer").outputs["steps_trained"] == "4"
    trained = load_safetensors((tmp_path / "straight" / LORA).read_bytes())
    averaged = load_safetensors((tmp_path / "straight" / "ema" / LORA).read_bytes())
    assert trained.keys() == averaged.keys()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained)  # the average lags the weights
    train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 2, "stopped", **ema), store)
    train_embedded(_configs(tmp_path, tiny_sd3_path, tmp_path / "data", 4, "stopped", **ema), store)
    resumed = load_safetensors((tmp_path / "stopped" / "ema" / LORA).read_bytes())
    for key in averaged:
        assert torch.equal(resumed[key], averaged[key]), key


def test_ema_validation_samples_both(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, optimizer="adamw", use_ema=True,
                           ema_validation="comparison")
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["validation_images"] == "2"
    images = sorted(p.name for p in (tmp_path / "output" / "validation_images").iterdir())
    assert images == ["step_2_validation_64x64.png", "step_2_validation_ema_64x64.png"]


def test_gradient_checkpointing_interval_checkpoints_every_nth_block(tiny_sd3_path: Path) -> None:
    from stagetune.models.checkpointing import checkpoint_every
    from stagetune.models.sd3.components import load_transformer

    def run(interval: int | None) -> tuple[list[int], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = load_transformer(str(tiny_sd3_path))
        model.train()
        checkpointed: list[int] = []
        if interval is not None:
            model.enable_gradient_checkpointing()
            inner = model._gradient_checkpointing_func

            def counting(block, *args):  # noqa: ANN001, ANN202 - counts what reaches torch's checkpoint
                checkpointed.append(1)
                return inner(block, *args)

            model._gradient_checkpointing_func = counting
            model.enable_gradient_checkpointing = lambda: None  # already on: keep the counter in place
            checkpoint_every(model, interval)
        config = model.config
        x = torch.randn(2, config.in_channels, 8, 8)
        text = torch.randn(2, 10, config.joint_attention_dim)
        pooled = torch.randn(2, config.pooled_projection_dim)
        for _ in range(2):  # two forwards: the count restarts each time
            out = model(hidden_states=x, timestep=torch.tensor([100.0, 700.0]), encoder_hidden_states=text,
                        pooled_projections=pooled, return_dict=False)[0]
            out.pow(2).mean().backward()
        return checkpointed, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    blocks = len(load_transformer(str(tiny_sd3_path)).transformer_blocks)
    _, plain = run(None)
    every, grads_every = run(1)
    second, grads_second = run(2)
    assert len(every) == 2 * blocks and len(second) == 2 * ((blocks + 1) // 2)
    for name, grad in plain.items():  # recomputation changes no number
        assert torch.equal(grads_every[name], grad) and torch.equal(grads_second[name], grad), name


def test_sageattention_without_the_package_is_a_clear_error() -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import PreconditionError

    base = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 2}
    with pytest.raises(PreconditionError, match="needs the sageattention package") as info:
        load_train_config({**base, "attention_mechanism": "sageattention"})
    assert info.value.field == "attention_mechanism"


# --------------------------------------------------------------------------------------- validation previews


def test_validation_previews_are_streamed_and_saved(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from test_end_to_end import write_configs

    from stagetune.core.client import follow
    from stagetune.core.store.local import LocalStore
    from stagetune.pipeline import start_embedded
    from stagetune.v1 import common_pb2, validation_pb2, validation_pb2_grpc

    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, optimizer="adamw", validation_preview=True,
                           validation_preview_steps=1)
    train_embedded(config, str(tmp_path / "store"))
    previews = sorted(p.name for p in (tmp_path / "output" / "validation_images" / "previews").iterdir())
    assert previews == ["step_2_validation_64x64_sample_1.png", "step_2_validation_64x64_sample_2.png"]

    # the same through the API: Preview events while sampling, one per preview step
    servers = start_embedded(LocalStore(tmp_path / "store2"))
    try:
        import grpc

        with grpc.insecure_channel(servers["validation"].address) as channel:
            stub = validation_pb2_grpc.ValidationServiceStub(channel)
            job = stub.Start(validation_pb2.StartValidationRequest(
                model=common_pb2.ModelRef(name_or_path=str(tiny_sd3_path), family="sd3"), step=5,
                prompts=[validation_pb2.ValidationPrompt(name="cat", prompt="a cat")],
                sampling=validation_pb2.SamplingOptions(num_inference_steps=4, guidance_scale=1.0, preview_steps=2,
                                                        resolutions=[validation_pb2.Resolution(width=64, height=64)])),
                timeout=30)
            events: list = []
            follow(stub, job, events.append)
    finally:
        for server in servers.values():
            server.stop(0)
    names = [e.preview.name for e in events if e.WhichOneof("body") == "preview"]
    assert names == ["cat (sampling step 2)", "cat (sampling step 4)", "cat"]

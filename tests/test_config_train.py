"""config.json loading: SimpleTuner users' files must load unchanged, and nothing may be silently ignored."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.keys import normalise_key
from stagetune.core.config.train import (
    SUPPORTED_KEYS,
    TrainConfig,
    load_train_config,
    parse_validation_resolution,
)
from stagetune.core.errors import ConfigError, NotSupportedError, PreconditionError

#: The user's source documents (SimpleTuner quickstarts) live beside the repository, not in it: their text is
#: not ours to copy. `STAGETUNE_SEEDS` points elsewhere; without them the seed tests are skipped, saying so.
SEEDS = Path(os.environ.get("STAGETUNE_SEEDS") or Path(__file__).resolve().parents[1].parent / "shared" / "seeds")
BASE: dict[str, Any] = {
    "model_type": "lora",
    "model_family": "sd3",
    "pretrained_model_name_or_path": "/nowhere/sd3",
}


def load(extra: dict[str, Any] | None = None, **kwargs: Any) -> TrainConfig:
    return load_train_config({**BASE, **(extra or {})}, **kwargs)


def seed_texts() -> dict[str, str]:
    files = sorted(SEEDS.glob("0*.txt"))
    if not files:
        pytest.skip(f"seed documents not found under {SEEDS} (set STAGETUNE_SEEDS)")
    return {f.name: f.read_text(encoding="utf-8") for f in files}


def json_blocks(text: str) -> list[Any]:
    """Every ```json block, including fragments like `"--key": "value",` that the Sana guide shows."""
    out = []
    for block in re.findall(r"```json\s*\n(.*?)```", text, re.S):
        body = block.strip()
        try:
            out.append(json.loads(body))
        except json.JSONDecodeError:
            out.append(json.loads("{" + body.rstrip().rstrip(",") + "}"))
    return out


def config_blocks(text: str) -> list[dict[str, Any]]:
    """config.json examples: JSON objects (lists are multidatabackend.json; prompt libraries are excluded)."""
    blocks = [b for b in json_blocks(text) if isinstance(b, dict)]
    return [b for b in blocks if any(normalise_key(k) in st.known_keys() for k in b)]


# ------------------------------------------------------------------------------------------- the seed example


def test_seed_000_example_config_loads(tmp_path: Path) -> None:
    example = config_blocks(seed_texts()["000_2c8829940f8a1939.txt"])[0]
    assert example["model_family"] == "sd3"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user_prompt_library.json").write_text(
        json.dumps({"cat": "a photo of a cat", "dog": {"prompt": "a photo of a dog"}})
    )
    config = load_train_config(example, overrides={"pretrained_model_name_or_path": "/nowhere/sd3"}, base_dir=tmp_path)
    assert config.model_type == "lora" and config.model_family == "sd3"
    assert config.pretrained_model_name_or_path == "/nowhere/sd3"
    assert config.output_dir == Path("/home/user/outputs/models")
    assert config.validation_resolution == [(1024, 1024), (1280, 768)]
    assert config.validation_guidance == 3.0
    assert config.validation_prompt == "your main test prompt here"
    assert config.user_prompt_library == tmp_path / "config" / "user_prompt_library.json"
    assert config.user_prompts == {"cat": "a photo of a cat", "dog": "a photo of a dog"}
    # SimpleTuner defaults for what the example leaves out
    assert config.flow_schedule_shift == 3.0
    assert config.family_options["tokenizer_max_length"] == 154
    assert config.learning_rate == 4e-7
    assert config.checkpointing_steps == 500 and config.validation_steps == 100
    assert config.validation_negative_prompt == "blurry, cropped, ugly"
    # SimpleTuner's optimizer and clipping defaults, unchanged and without a word
    assert config.optimizer == "adamw_bf16" and config.lr_scheduler == "constant_with_warmup"
    assert config.grad_clip_method == "value" and config.max_grad_norm == 2.0
    assert not any("adamw_bf16" in w or "grad_clip_method" in w for w in config.warnings)


def test_seed_slg_example_with_dash_dash_keys() -> None:
    slg = next(b for b in config_blocks(seed_texts()["000_2c8829940f8a1939.txt"]) if "--validation_guidance" in b)
    config = load(slg)
    assert config.family_options["validation_guidance_skip_layers"] == [7, 8, 9]
    assert config.family_options["validation_guidance_skip_layers_start"] == 0.01
    assert config.family_options["validation_guidance_skip_layers_stop"] == 0.2
    assert config.family_options["validation_guidance_skip_scale"] == 2.8
    assert config.validation_guidance == 4.0
    assert config.flow_use_uniform_schedule is True and config.flow_schedule_auto_shift is True
    assert not any("skip_layers" in w for w in config.warnings)  # 30 steps: fires at steps 1..5


def test_same_option_under_two_spellings_takes_the_later_as_simpletuner() -> None:
    config = load({"--seed": 1, "seed": 2})
    assert config.seed == 2 and any("'--seed' and 'seed' both set seed: using the later, 2" in w
                                    for w in config.warnings)
    config = load({"checkpointing_steps": 10, "--checkpoint_step_interval": 20})
    assert config.checkpointing_steps == 20
    quiet = load({"seed": 3, "--seed": 3})  # the same value twice: nothing to say
    assert quiet.seed == 3 and not any("both set" in w for w in quiet.warnings)


def test_simpletuner_aliases_and_legacy_names() -> None:
    config = load({"checkpoint_step_interval": 50, "--validation_step_interval": "25", "save_total_limit": 2})
    assert config.checkpointing_steps == 50
    assert config.validation_steps == 25
    assert config.checkpoints_total_limit == 2


def test_overrides_win_in_any_spelling() -> None:
    config = load({"learning_rate": 1e-4}, overrides={"--learning_rate": "2e-4", "seed": 7})
    assert config.learning_rate == 2e-4 and config.seed == 7


def test_config_file_path(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "--max_train_steps": 100, "num_train_epochs": 0}))
    config = load_train_config(path, base_dir=tmp_path)
    assert config.source_path == path and config.max_train_steps == 100 and config.uses_max_train_steps
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_train_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_train_config(tmp_path / "list.json")


# ------------------------------------------------------------------------------------- values as SimpleTuner


def test_env_placeholders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAGETUNE_TEST_MODELS", "/models")
    config = load({"pretrained_model_name_or_path": "{env:STAGETUNE_TEST_MODELS}/sd3.5"})
    assert config.pretrained_model_name_or_path == "/models/sd3.5"
    monkeypatch.setenv("STAGETUNE_TEST_SEED", "42")
    assert load({"seed": "{env:STAGETUNE_TEST_SEED}"}).seed == 42
    monkeypatch.delenv("STAGETUNE_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="STAGETUNE_TEST_UNSET") as err:
        load({"output_dir": "{env:STAGETUNE_TEST_UNSET}/out"})
    assert err.value.field == "output_dir"


def test_null_and_empty_mean_simpletuner_default() -> None:
    config = load({"learning_rate": None, "seed": None, "lora_rank": "", "validation_negative_prompt": ""})
    assert config.learning_rate == 4e-7 and config.seed is None and config.lora_rank == 16
    assert config.validation_negative_prompt == ""  # SimpleTuner keeps an empty negative prompt


def test_strings_for_numbers_and_booleans() -> None:
    config = load(
        {
            "learning_rate": "1e-4",
            "max_train_steps": "1000",
            "num_train_epochs": "0",
            "train_batch_size": 2.0,
            "gradient_checkpointing": "false",
            "flow_schedule_auto_shift": "true",
            "flow_use_uniform_schedule": "yes",
            "resolution": "512",
        }
    )
    assert config.learning_rate == 1e-4 and config.max_train_steps == 1000 and config.train_batch_size == 2
    assert config.gradient_checkpointing is False
    assert config.flow_schedule_auto_shift is True and config.flow_use_uniform_schedule is True
    assert config.resolution == 512 and isinstance(config.resolution, int)
    assert load({"resolution": 1.0, "resolution_type": "area"}).resolution == 1.0
    with pytest.raises(ConfigError, match="train_batch_size") as err:
        load({"train_batch_size": "four"})
    assert err.value.field == "train_batch_size"
    with pytest.raises(ConfigError, match="integer"):
        load({"train_batch_size": 1.5})
    with pytest.raises(ConfigError, match="true or false"):
        load({"gradient_checkpointing": "maybe"})
    with pytest.raises(ConfigError, match="train_batch_size"):
        load({"train_batch_size": 0})


def test_resume_from_checkpoint_values() -> None:
    assert load().resume_from_checkpoint == "latest"
    assert load({"resume_from_checkpoint": "none"}).resume_from_checkpoint is None
    assert load({"resume_from_checkpoint": "checkpoint-500"}).resume_from_checkpoint == "checkpoint-500"


# ---------------------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'") as err:
        load({"learning_rat": 1e-4})
    assert not isinstance(err.value, NotSupportedError)
    assert err.value.field == "learning_rat"
    with pytest.raises(ConfigError, match="did you mean 'validation_guidance_skip_layers'"):
        load({"--validation_guidance_skip_layer": [7]})


def test_invalid_values_are_config_errors_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="mixed_precision: invalid value fp32") as err:
        load({"mixed_precision": "fp32"})
    assert not isinstance(err.value, NotSupportedError)
    with pytest.raises(ConfigError, match="did you mean 'sd3'"):
        load({"model_family": "sd33"})
    with pytest.raises(ConfigError, match="unknown optimizer 'adamw8bitt'"):
        load({"optimizer": "adamw8bitt"})
    with pytest.raises(ConfigError, match="t5_padding"):
        load({"t5_padding": "left"})


# ---------------------------------------------------------------------------------------- not supported yet


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_family", "flux"),
        ("optimizer", "soap"),
        ("optimizer", "sdnq-adamw"),
        ("optimizer", "ao-adamw8bit"),
        ("lora_init_type", "loftq"),
        ("base_model_precision", "int8-torchao"),
        ("base_model_precision", "fp8-torchao"),
        ("text_encoder_1_precision", "int8-torchao"),
        ("text_encoder_3_precision", "int8-sdnq"),
        ("mixed_precision", "fp8"),
        ("attention_mechanism", "xformers"),
    ],
)
def test_not_supported_values_name_key_and_value(key: str, value: Any) -> None:
    with pytest.raises(NotSupportedError) as err:
        load({key: value})
    shown = str(value).lower() if isinstance(value, bool) else str(value)
    assert f"not supported yet: {key}={shown}" in str(err.value)
    assert err.value.field == key


def test_missing_model_type_is_simpletuners_full() -> None:
    config = load_train_config({"model_family": "sd3", "pretrained_model_name_or_path": "x", "max_train_steps": 1})
    assert config.model_type == "full"


def test_required_keys() -> None:
    with pytest.raises(ConfigError, match="model_family is required"):
        load_train_config({"model_type": "lora", "pretrained_model_name_or_path": "x"})
    with pytest.raises(ConfigError, match="pretrained_model_name_or_path is required"):
        load_train_config({"model_type": "lora", "model_family": "sd3"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("vae_enable_tiling", True),
        ("ignore_final_epochs", False),
        ("masked_loss_probability", 0.5),
    ],
)
def test_recognised_key_away_from_default_is_not_supported(key: str, value: Any) -> None:
    with pytest.raises(NotSupportedError, match=f"not supported yet: {normalise_key(key)}") as err:
        load({key: value})
    assert repr(value) in str(err.value)


def test_recognised_keys_at_simpletuner_default_are_accepted() -> None:
    config = load(
        {
            "use_ema": False,
            "ema_decay": "0.995",
            "lora_init_type": "default",
            "text_encoder_4_precision": "no_change",
            "skip_file_discovery": "",
            "checkpoint_epoch_interval": None,
            "disable_tf32": "false",
            "vae_cache_preprocess": True,
            "validation_preview": False,
            "validation_preview_steps": 5,
            "quantize_via": "cpu",
            "base_model_default_dtype": "fp32",
            "push_to_hub": "false",
            "report_to": "none",
        }
    )
    assert config.validation_preview_steps == 5 and config.quantize_via == "cpu"


def test_unknown_key_is_an_error_even_when_null() -> None:
    with pytest.raises(ConfigError, match="did you mean 'use_ema'"):
        load({"--use_emma": None})


def test_ignored_keys_warn() -> None:
    config = load({"repeats": 3})
    assert any("repeats is ignored" in w for w in config.warnings)


# ------------------------------------------------------------------------------------ optimizer and schedule


@pytest.mark.parametrize("name", ["adamw", "torch-adamw", "adamw_torch", "AdamW", "torch_adamw"])
def test_adamw_aliases(name: str) -> None:
    config = load({"optimizer": name})
    assert config.optimizer == "torch-adamw"
    assert not any("adamw_bf16" in w for w in config.warnings)


def test_constant_with_warmup_steps_becomes_constant_with_warmup() -> None:
    config = load({"lr_scheduler": "constant", "lr_warmup_steps": 10})
    assert config.lr_scheduler == "constant_with_warmup"
    assert any("constant_with_warmup" in w for w in config.warnings)
    assert load({"lr_scheduler": "constant"}).lr_scheduler == "constant"


def test_max_train_steps_wins_over_epochs() -> None:
    config = load({"max_train_steps": 200, "num_train_epochs": 3})
    assert config.uses_max_train_steps and config.max_train_steps == 200
    assert any("max_train_steps decides" in w for w in config.warnings)
    quiet = load({"max_train_steps": 200})  # num_train_epochs left at SimpleTuner's default 1
    assert not any("max_train_steps" in w for w in quiet.warnings)
    assert not load({"num_train_epochs": 2}).uses_max_train_steps
    with pytest.raises(ConfigError, match="max_train_steps or num_train_epochs"):
        load({"num_train_epochs": 0})
    with pytest.raises(ConfigError, match="max_train_steps"):
        load({"max_train_steps": -1})


def test_tokenizer_max_length_clamped_to_sd3_limit() -> None:
    assert load({"tokenizer_max_length": 77}).family_options["tokenizer_max_length"] == 77
    config = load({"tokenizer_max_length": 512})
    assert config.family_options["tokenizer_max_length"] == 154 and any("154" in w for w in config.warnings)


def test_flow_schedule_warnings() -> None:
    config = load({"flow_use_uniform_schedule": True, "flow_use_beta_schedule": True})
    assert any("uniform schedule is used" in w for w in config.warnings)
    config = load({"flow_schedule_auto_shift": True, "flow_schedule_shift": 1})
    assert any("replaces flow_schedule_shift" in w for w in config.warnings)


# ------------------------------------------------------------------------------------- validation options


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", [(1024, 1024)]),
        (1024, [(1024, 1024)]),
        ("1024x1024,1280x768", [(1024, 1024), (1280, 768)]),
        (" 832x1216 , 1024 ", [(832, 1216), (1024, 1024)]),
        ("1", [(1024, 1024)]),
        (["1024x768", "512"], [(1024, 768), (512, 512)]),
    ],
)
def test_validation_resolution_parsing(value: Any, expected: list[tuple[int, int]]) -> None:
    assert parse_validation_resolution(value) == expected
    assert load({"validation_resolution": value}).validation_resolution == expected


@pytest.mark.parametrize("value", ["1024x", "x768", "1024x768x2", "big", "0.5", "2", "", "0x0"])
def test_validation_resolution_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_validation_resolution(value)
    assert err.value.field == "validation_resolution"


def test_validation_resolution_default_is_simpletuners() -> None:
    assert load().validation_resolution == [(256, 256)]


@pytest.mark.parametrize("value", [[7, 8, 9], "[7, 8, 9]", "7,8,9", ["7", "8", "9"]])
def test_skip_layers_forms(value: Any) -> None:
    assert load({"validation_guidance_skip_layers": value}).family_options["validation_guidance_skip_layers"] == [
        7, 8, 9]
    with pytest.raises(ConfigError, match=">= 0"):
        load({"validation_guidance_skip_layers": [-1]})


def test_skip_layer_guidance_that_cannot_fire_warns() -> None:
    low_cfg = load({"validation_guidance_skip_layers": [7], "validation_guidance": 1.0})
    assert any("<= 1" in w for w in low_cfg.warnings)
    # 2 steps: steps*start = 0.02 < i < 0.4 = steps*stop holds for no integer i
    two_steps = load(
        {"validation_guidance_skip_layers": [7], "validation_guidance": 4.0, "validation_num_inference_steps": 2}
    )
    assert any("never fires" in w for w in two_steps.warnings)
    # stop boundary is strict: 10 steps, start 0.1, stop 0.2 → 1 < i < 2 has no integer
    strict = load(
        {
            "validation_guidance_skip_layers": [7],
            "validation_guidance": 4.0,
            "validation_num_inference_steps": 10,
            "validation_guidance_skip_layers_start": 0.1,
            "validation_guidance_skip_layers_stop": 0.2,
        }
    )
    assert any("never fires" in w for w in strict.warnings)
    fires = load({"validation_guidance_skip_layers": [7], "validation_guidance": 4.0})
    assert not any("skip_layers" in w for w in fires.warnings)


def test_user_prompt_library_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "lib.json").write_text(json.dumps({"a": "first prompt", "b": "second"}))
    config = load({"user_prompt_library": "lib.json"}, base_dir=tmp_path)
    assert config.user_prompts == {"a": "first prompt", "b": "second"}


def test_user_prompt_library_next_to_config_file(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "config").mkdir(parents=True)
    (project / "config" / "user_prompt_library.json").write_text(json.dumps({"n": "p"}))
    path = project / "config" / "config.json"
    path.write_text(json.dumps({**BASE, "user_prompt_library": "config/user_prompt_library.json"}))
    config = load_train_config(path, base_dir=tmp_path / "elsewhere")
    assert config.user_prompts == {"n": "p"}


def test_user_prompt_library_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*missing\.json") as err:
        load({"user_prompt_library": "missing.json"}, base_dir=tmp_path)
    assert err.value.field == "user_prompt_library"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid JSON"):
        load({"user_prompt_library": "bad.json"}, base_dir=tmp_path)
    (tmp_path / "list.json").write_text('["a"]')
    with pytest.raises(ConfigError, match="nickname"):
        load({"user_prompt_library": "list.json"}, base_dir=tmp_path)
    (tmp_path / "empty.json").write_text('{"a": ""}')
    with pytest.raises(ConfigError, match="'a'"):
        load({"user_prompt_library": "empty.json"}, base_dir=tmp_path)


# ------------------------------------------------------------------------------------------ datasets


def test_dataset_defaults_for_the_dataset_loader() -> None:
    config = load({"resolution": 512, "crop": "true", "caption_strategy": "instance_prompt", "instance_prompt": "sks"})
    defaults = config.dataset_defaults()
    assert defaults == {
        "resolution": 512,
        "resolution_type": "pixel_area",
        "crop": True,
        "crop_style": "random",
        "crop_aspect": "square",
        "minimum_image_size": None,
        "maximum_image_size": None,
        "target_downsample_size": None,
        "caption_strategy": "instanceprompt",
        "instance_prompt": "sks",
    }
    assert config.explicit_keys >= {"resolution", "crop", "caption_strategy", "instance_prompt"}


# -------------------------------------------------------------------------------------------- catalogue


def test_catalogue_matches_simpletuner_defaults() -> None:
    assert st.SIMPLETUNER_VERSION == "4.8.0"
    assert len(st.OPTIONS) > 500
    assert st.OPTIONS["flow_schedule_shift"].default == 3.0
    assert st.OPTIONS["optimizer"].default == "adamw_bf16"
    assert st.OPTIONS["grad_clip_method"].default == "value"
    assert st.OPTIONS["model_type"].choices == ("full", "lora")
    assert all(target in st.OPTIONS for target in st.ALIASES.values())
    assert all(target in st.OPTIONS for target in st.RENAMED_LEGACY_KEYS.values())
    assert "sana" in st.OPTIONS["model_family"].choices
    assert {"prodigy", "optimi-adamw", "bnb-lion8bit-paged", "adamw_bf16"} <= set(st.OPTIMIZERS)


def test_train_config_defaults_are_simpletuners_except_where_documented() -> None:
    departures = {
        "model_family",  # SimpleTuner: none (required)
        "lycoris_config", "init_lora",  # Paths
        "tokenizer_max_length",  # SimpleTuner: None, then SD3 sets 154
        "sd3_t5_uncond_behaviour",  # SimpleTuner: None = follow CLIP's setting
        "validation_resolution",  # parsed form of "256"
        "output_dir",  # a Path
    }
    config = load()
    for key in SUPPORTED_KEYS:
        field = {"checkpoint_step_interval": "checkpointing_steps", "validation_step_interval": "validation_steps"}
        name = field.get(key, key)
        if name in departures or name in BASE:
            continue
        option = st.OPTIONS.get(key) or st.LEGACY_GLOBAL_OPTIONS[key]
        assert getattr(config, name) == option.default, key
    assert config.output_dir == Path.cwd() / "simpletuner-results"


# ------------------------------------------------------------------------------------------- every seed key


def seed_keys() -> dict[str, tuple[str, Any]]:
    """Option keys the seed documents show, with an example value where they give one.

    Sources: config.json examples (```json objects, incl. the `--` forms), `--flag` in backticks and in
    TRAINER_EXTRA_ARGS lines, the "- `key` - ..." option lists, and "- key=value" stable-value lists.
    """
    found: dict[str, tuple[str, Any]] = {}
    for name, text in seed_texts().items():
        for block in config_blocks(text):
            for key, value in block.items():
                found.setdefault(normalise_key(key), (name, value))
        for key, value in re.findall(r"`--([a-z][a-z0-9_]*)(?:=([^`\s]+))?`", text):
            found.setdefault(key, (name, value or None))
        for line in re.findall(r"TRAINER_EXTRA_ARGS=.*", text):
            for key, value in re.findall(r"--([a-z][a-z0-9_]*)=?([^\s\"]*)", line):
                found.setdefault(key, (name, value or None))
        for key in re.findall(r"^\s*-\s+`([a-z][a-z0-9_]*)`\s+-", text, re.M):
            found.setdefault(key, (name, None))
        for key, value in re.findall(r"^\s*-\s+`?([a-z][a-z0-9_]*)=([^`\s]+)", text, re.M):
            found.setdefault(key, (name, value))
    return found


#: "batch_size=4 * 3 GPUs" in the stability notes is prose, not a key SimpleTuner knows.
PROSE_NOT_KEYS = {"batch_size"}


def test_seed_extraction_finds_the_documented_options() -> None:
    keys = set(seed_keys())
    assert {
        "validation_guidance_skip_layers",
        "base_model_precision",
        "text_encoder_3_precision",
        "flow_schedule_auto_shift",
        "user_prompt_library",
        "gradient_checkpointing_interval",
        "use_ema",
        "vae_cache_disable",
        "validation_preview_steps",
        "sd3_t5_uncond_behaviour",
        "base_model_default_dtype",
        "quantize_via",
        "data_backend_config",
    } <= keys


def test_every_seed_key_is_recognised() -> None:
    unknown = sorted(k for k in seed_keys() if k not in st.known_keys() and k not in PROSE_NOT_KEYS)
    assert unknown == []


def test_every_seed_key_with_its_seed_value_loads_or_is_clearly_not_supported(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user_prompt_library.json").write_text('{"n": "p"}')
    outcomes: dict[str, str] = {}
    for key, (source, value) in sorted(seed_keys().items()):
        if key in PROSE_NOT_KEYS:
            with pytest.raises(ConfigError, match="did you mean"):
                load({key: value})
            continue
        if value is None:
            option = st.OPTIONS.get(key) or st.LEGACY_GLOBAL_OPTIONS.get(key)
            value = True if option and option.type == "bool" else (option.default if option else None)
            if key == "gradient_checkpointing_interval":
                value = 2
        try:
            load({key: value}, base_dir=tmp_path)
            outcomes[key] = "ok"
        except NotSupportedError as err:
            assert key in str(err) and err.field == key, (source, key, str(err))
            outcomes[key] = "not supported"
        except PreconditionError as err:  # supported, but needs what this machine lacks (a CUDA package)
            assert err.field == key, (source, key, str(err))
            outcomes[key] = "not available here"
    assert outcomes["validation_guidance_skip_layers"] == "ok"
    assert outcomes["base_model_precision"] == "ok"  # int8-quanto
    assert outcomes["optimizer"] == "ok"  # adamw_bf16
    assert outcomes["use_ema"] == "ok" and outcomes["gradient_checkpointing_interval"] == "ok"
    assert outcomes["attention_mechanism"] == "not available here"  # sageattention, a CUDA package


def test_every_seed_config_block_loads_or_names_what_is_not_supported(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "user_prompt_library.json").write_text('{"n": "p"}')
    for name, text in seed_texts().items():
        for block in config_blocks(text):
            try:
                load(block, base_dir=tmp_path)
            except ConfigError as err:  # every refused key at once, each named and in the block
                for problem in err.problems:
                    assert isinstance(problem, NotSupportedError), (name, str(problem))
                    assert problem.field in {normalise_key(k) for k in block}, (name, block, str(problem))


def test_sana_guide_settings_load() -> None:
    """The Sana guide (seed 003) sets these in its option list; all of them load now."""
    text = seed_texts()["003_ecfc6d00628a8bf1.txt"]
    for key, value in {"model_family": "sana", "model_type": "full", "optimizer": "optimi-adamw",
                       "mixed_precision": "bf16", "use_ema": "true"}.items():
        assert re.search(rf"^- `{key}` - .*`{re.escape(value)}`", text, re.M), key
    config = load({"model_family": "sana", "model_type": "full", "optimizer": "optimi-adamw",
                   "mixed_precision": "bf16", "use_ema": True, "validation_num_inference_steps": 50,
                   "train_batch_size": 6, "gradient_checkpointing": True, "gradient_checkpointing_interval": 2})
    assert config.model_family == "sana" and config.model_type == "full" and config.use_ema
    assert config.family_options["sana_complex_human_instruction"]  # SimpleTuner's default instruction


def test_old_vae_cache_preprocess_false_means_encode_during_training() -> None:
    base = {"model_family": "sd3", "model_type": "lora", "pretrained_model_name_or_path": "x", "max_train_steps": 1}
    assert load_train_config({**base, "vae_cache_preprocess": False}).vae_cache_ondemand is True
    assert load_train_config({**base, "--vae_cache_preprocess": "true"}).vae_cache_ondemand is False
    assert load_train_config({**base, "vae_cache_disable": True}).vae_cache_disable is True

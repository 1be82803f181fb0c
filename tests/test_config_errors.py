"""Config and dataset mistakes are reported early, all at once, and name what to fix.

Also: the SimpleTuner options that change nothing about training are accepted (config/no_effect.py),
`allow_dataset_oversubscription` raises repeats as SimpleTuner does, and a dataset with nothing usable
stops ingest naming every reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.config.no_effect import NO_EFFECT
from stagetune.core.config.train import SUPPORTED_KEYS, TrainConfig, config_from_json, load_train_config
from stagetune.core.errors import ConfigError, ConfigProblems, InputError, NotSupportedError
from stagetune.core.store.local import LocalStore
from stagetune.ingest.run import run_ingest

BASE = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 4}
TEXT_EMBEDS = {"id": "text", "dataset_type": "text_embeds", "default": True}


def _image(path: Path, size: tuple[int, int] = (256, 256), colour: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 40, 200)).save(path)
    return path


def _ingest(tmp_path: Path, entry: dict[str, Any], **kwargs: Any):
    backends = load_data_backend_config([entry, TEXT_EMBEDS], base_dir=tmp_path)
    return run_ingest(backends, LocalStore(tmp_path / "store", fsync=False), **{"train_batch_size": 1, **kwargs})


def _entry(**kwargs: Any) -> dict[str, Any]:
    return {"id": "ds", "instance_data_dir": "data", "resolution": 256, "resolution_type": "pixel", **kwargs}


# ----------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize(("text", "kind"), [("[]", "a list"), ('"sd3"', "a string"), ("3", "a number"),
                                            ("null", "null")])
def test_config_that_is_not_an_object_is_a_clear_error(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"must be a JSON object of option -> value, got {kind}") as info:
        load_train_config(path)
    assert info.value.field == "config"
    with pytest.raises(ConfigError, match=f"got {kind}") as info:
        config_from_json(text)  # the JSON text, as the gRPC API receives it
    assert info.value.field == "config_json"


def test_every_refused_key_and_bad_value_is_reported_at_once() -> None:
    config = {
        **BASE,
        "learnin_rate": 1e-4,  # typo
        "base_model_precision": "int8-torchao",  # not built yet
        "lora_rank": 0,  # out of range
        "validation_resolution": "huge",  # unparsable
        "--train_batch_size": "two",  # wrong type
    }
    with pytest.raises(ConfigProblems) as info:
        load_train_config(config)
    problems = info.value.problems
    assert {p.field for p in problems} == {
        "learnin_rate", "base_model_precision", "lora_rank", "validation_resolution", "train_batch_size"}
    assert isinstance(info.value, ConfigError) and info.value.grpc_code == "INVALID_ARGUMENT"
    message = str(info.value)
    assert message.startswith("5 problems in config.json:")
    assert "did you mean 'learning_rate'" in message and "not supported yet: base_model_precision" in message
    assert sum(isinstance(p, NotSupportedError) for p in problems) == 1
    assert message.count("\n  - ") == 5  # one line each, each once


def test_a_single_problem_keeps_its_own_class() -> None:
    with pytest.raises(NotSupportedError) as info:
        load_train_config({**BASE, "base_model_precision": "int8-torchao"})
    assert not isinstance(info.value, ConfigProblems) and info.value.field == "base_model_precision"


def test_missing_required_keys_are_reported_together_with_typos() -> None:
    with pytest.raises(ConfigProblems) as info:
        load_train_config({"model_typ": "lora", "max_train_steps": 1})
    assert {p.field for p in info.value.problems} == {
        "model_typ", "model_family", "pretrained_model_name_or_path"}  # model_type: SimpleTuner's full


# ------------------------------------------------------------------------------ options with no effect


def test_no_effect_options_are_simpletuner_options_and_not_trainconfig_fields() -> None:
    assert set(NO_EFFECT) <= set(st.OPTIONS)
    assert not set(NO_EFFECT) & SUPPORTED_KEYS
    assert {"tracker_image_layout", "push_to_hub_background", "disable_benchmark", "webhook_config"} <= set(NO_EFFECT)


def test_every_no_effect_option_loads_at_a_non_default_value() -> None:
    for key, option in NO_EFFECT.items():
        spec = st.OPTIONS[key]
        if spec.choices:
            value = next(c for c in spec.choices if c != spec.default)
        elif spec.type == "bool":
            value = not spec.default
        elif spec.type == "int":
            value = (spec.default or 0) + 3
        else:
            value = "something-else"
        config = load_train_config({**BASE, key: value})
        assert config.no_effect[key] == value, key
        assert any(w.startswith(f"{key}=") and option in w for w in config.warnings), key


def test_no_effect_options_are_still_checked_and_quiet_at_their_default() -> None:
    with pytest.raises(ConfigError, match="did you mean 'wandb'") as info:
        load_train_config({**BASE, "report_to": "wandbb"})
    assert info.value.field == "report_to"
    with pytest.raises(ConfigError, match="expected true or false"):
        load_train_config({**BASE, "push_to_hub": "perhaps"})
    quiet = load_train_config({**BASE, "report_to": "none", "disable_benchmark": False, "--push_to_hub": "false"})
    assert not any(w.split("=")[0] in NO_EFFECT for w in quiet.warnings)


def test_the_users_unchanged_config_with_logging_and_benchmark_keys_loads() -> None:
    config = load_train_config({
        **BASE, "validation_disable": True, "disable_benchmark": True, "report_to": "comet_ml",
        "tracker_image_layout": "table", "push_to_hub": True, "hub_model_id": "me/lora",
        "allow_dataset_oversubscription": True,
    })
    assert config.validation_disable is True and config.allow_dataset_oversubscription is True
    assert config.report_to == "comet_ml" and config.no_effect["tracker_image_layout"] == "table"


def test_trainconfig_fields_exist_for_implemented_keys() -> None:
    assert {"validation_disable", "allow_dataset_oversubscription"} <= set(TrainConfig.model_fields)
    assert TrainConfig.model_fields["validation_disable"].default is False


# --------------------------------------------------------------------------------- multidatabackend.json


def test_dataset_config_problems_across_entries_are_reported_at_once(tmp_path: Path) -> None:
    entries = [
        _entry(id="a", resolutoin=512),  # typo
        _entry(id="b", crop_style="face"),  # not built yet
        _entry(id="c", repeats=-1),  # bad value
        TEXT_EMBEDS,
    ]
    with pytest.raises(ConfigProblems) as info:
        load_data_backend_config(entries, base_dir=tmp_path)
    assert [p.field for p in info.value.problems] == ["resolutoin", "crop_style", "repeats"]
    assert "'a'" in str(info.value) and "'b'" in str(info.value) and "'c'" in str(info.value)


@pytest.mark.parametrize(("text", "kind"), [("{}", "an object"), ('"x"', "a string")])
def test_dataset_config_that_is_not_a_list(tmp_path: Path, text: str, kind: str) -> None:
    path = tmp_path / "multidatabackend.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"must be a JSON list of dataset objects, got {kind}"):
        load_data_backend_config(path)


# ------------------------------------------------------------------- datasets with nothing to train on


def test_empty_dataset_fails_at_ingest_naming_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(InputError, match=r"dataset 'ds' has no image files in .*data") as info:
        _ingest(tmp_path, _entry())
    assert info.value.field == "ds"
    assert not list((tmp_path / "store").glob("manifests/*/report.json"))  # no manifest written


def test_dataset_of_only_bad_files_names_each_file_and_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.png").write_bytes(b"")
    (data / "notes.jpg").write_text("not a picture")
    whole = _image(tmp_path / "whole.png").read_bytes()
    (data / "cut.png").write_bytes(whole[: len(whole) // 2])
    _image(data / "tiny.png", (64, 64))
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with pytest.raises(InputError) as info:
        _ingest(tmp_path, _entry(minimum_image_size=128))
    message = str(info.value)
    assert "dataset 'ds'" in message and "(4 file(s) found)" in message
    assert "empty.png: empty file" in message and "notes.jpg: not an image" in message
    assert "cut.png: truncated PNG" in message and "tiny.png:" in message and "minimum_image_size" in message
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before  # nothing deleted or changed


def test_identical_bad_copies_are_reported_under_their_own_names(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("first.png", "second.png"):
        path = data / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # the same broken bytes twice
    _image(data / "good.png")
    result = _ingest(tmp_path, _entry())
    bad = {Path(b["path"]).name: b["reason"] for b in result.report["bad_files"]}
    assert set(bad) == {"first.png", "second.png"}
    assert not any("first" in reason or "second" in reason for reason in bad.values())
    again = _ingest(tmp_path, _entry())  # from the facts cache, keyed by content
    assert {Path(b["path"]).name for b in again.report["bad_files"]} == {"first.png", "second.png"}


# -------------------------------------------------------------------- allow_dataset_oversubscription


def test_oversubscription_raises_repeats_as_simpletuner_does(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"data/sq{i}.png", colour=i)
    _image(tmp_path / "data/wide.png", (512, 256))
    # effective batch 2 × 2 GPUs × 1 = 4: squares need repeats 1 (3 × 2), the one wide image repeats 3 (1 × 4)
    with pytest.raises(InputError, match="allow_dataset_oversubscription"):
        _ingest(tmp_path, _entry(), train_batch_size=2, world_size=2)
    result = _ingest(tmp_path, _entry(), train_batch_size=2, world_size=2, allow_dataset_oversubscription=True)
    assert {r.bucket for r in result.samples} == {"1.0", "2.0"}
    assert {r.repeats for r in result.samples} == {3}  # the largest need, for the whole dataset
    assert result.report["pruned_buckets"] == []
    assert any("raised repeats from 0 to 3" in w for w in result.report["warnings"])
    assert result.report["datasets"]["ds"]["samples_with_repeats"] == 16


def test_oversubscription_leaves_repeats_the_dataset_sets(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"data/sq{i}.png", colour=i)
    for i in range(4):
        _image(tmp_path / f"data/wide{i}.png", (512, 256), colour=50 + i)
    result = _ingest(tmp_path, _entry(repeats=0), train_batch_size=4, allow_dataset_oversubscription=True)
    assert {r.bucket for r in result.samples} == {"2.0"} and {r.repeats for r in result.samples} == {0}
    (pruned,) = result.report["pruned_buckets"]
    assert pruned["bucket"] == "1.0" and pruned["repeats_needed"] == 1


# ------------------------------------------------------------------------------------------- the CLI


def test_cli_reports_every_problem_once_before_importing_torch(tmp_path: Path) -> None:
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "photos", "instance_data_dir": str(tmp_path / "no-such-folder")},
        {"id": "text", "dataset_type": "text_embeds", "default": True}]))
    (tmp_path / "config.json").write_text(json.dumps({
        **BASE, "pretrained_model_name_or_path": str(tmp_path / "no-such-model"), "learnin_rate": 1e-4,
        "data_backend_config": str(tmp_path / "multidatabackend.json"), "output_dir": str(tmp_path / "out")}))
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path / "store"))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "stagetune.cli", "train", "--config",
                           str(tmp_path / "config.json")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    imported = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [line for line in imported if re.search(r"\|\s+(torch|diffusers|grpc)(\.|$)", line)]
    said = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert "error: 3 problems:" in said
    for fragment in ("did you mean 'learning_rate'", "no-such-model does not exist", "no-such-folder does not exist"):
        assert sum(fragment in line for line in said) == 1, (fragment, said)
    assert not any("Traceback" in line for line in said)
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()  # nothing written


def test_dataset_keys_with_no_effect_load_at_any_value(tmp_path: Path) -> None:
    from stagetune.core.config.dataset import DATASET_NO_EFFECT

    values = {"cache_dir": "cache/vae/x", "compress_cache": True, "metadata_update_interval": 60,
              "scan_for_errors": True, "disable_validation": True, "write_batch_size": 64,
              "text_encoder_batch_size": 8, "vae_cache_ondemand": True, "text_cache_ondemand": True}
    assert set(values) == DATASET_NO_EFFECT
    backends = load_data_backend_config([_entry(**values), {**TEXT_EMBEDS, "compress_cache": True}],
                                        base_dir=tmp_path)
    assert backends.enabled[0].id == "ds"
    with pytest.raises(NotSupportedError, match="vae_cache_disable"):  # this one changes results: still refused
        load_data_backend_config([_entry(vae_cache_disable=True), TEXT_EMBEDS], base_dir=tmp_path)


def test_an_s3_output_dir_stays_a_url() -> None:
    url = "s3://bucket/runs/one?endpoint=http://127.0.0.1:9000"
    assert load_train_config({**BASE, "output_dir": url}).output_dir == url
    assert load_train_config({**BASE, "output_dir": "out"}, base_dir=Path("/base")).output_dir == Path("/base/out")


def test_check_reports_without_training_or_writing(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    _image(tmp_path / "data" / "a.png")
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "photos", "instance_data_dir": str(tmp_path / "data")},
        {"id": "text", "dataset_type": "text_embeds", "default": True}]))
    config = {**BASE, "pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
              "data_backend_config": str(tmp_path / "multidatabackend.json"), "report_to": "comet_ml"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, STAGETUNE_STORE=str(tmp_path / "store"))
    command = [sys.executable, "-m", "stagetune.cli", "train", "--check", "--config", str(tmp_path / "config.json")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "config OK: sd3 lora" in done.stdout and "starts a new run" in done.stdout
    assert "report_to=comet_ml changes nothing here" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "store").exists()
    (tmp_path / "config.json").write_text(json.dumps({**config, "lora_rank": 0, "learnin_rate": 1}))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "error: 2 problems" in done.stderr and "Traceback" not in done.stderr

"""report_to: the training scalars and validation images reach TensorBoard and W&B (offline, no network), in
SimpleTuner's places, and a resumed run continues the same tracker run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_end_to_end import make_dataset, train_embedded, write_configs

from stagetune.core.config.train import load_train_config
from stagetune.core.errors import PreconditionError

BASE = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/m", "max_train_steps": 2}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "images": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["images"]:
            found.setdefault(tag, []).extend((e.step, 0.0) for e in accumulator.Images(tag))
    return found


def test_tensorboard_gets_every_step_and_the_validation_images(tmp_path: Path, tiny_sd3_path: Path) -> None:
    make_dataset(tmp_path / "data")
    config = write_configs(tmp_path, tiny_sd3_path, steps=4, report_to="tensorboard",
                           tracker_project_name="shapes-project")
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["steps_trained"] == "4"
    logs = tmp_path / "output" / "logs" / "shapes-project"  # SimpleTuner's output_dir/logging_dir/project
    scalars = _scalars(logs)
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4]
    assert all(value > 0 for _, value in scalars["train_loss"])
    assert [step for step, _ in scalars["learning_rate"]] == [1, 2, 3, 4]
    assert {step for step, _ in scalars["validation/validation_64x64"]} == {2, 4}  # validation_steps 2


def test_wandb_offline_logs_and_a_resumed_run_continues_it(tmp_path: Path, tiny_sd3_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    extra = {"report_to": "wandb", "tracker_run_name": "my-run", "logging_dir": str(tmp_path / "wandb-logs")}
    train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=2, validation=False, **extra), store)
    ids = json.loads((tmp_path / "output" / ".stagetune" / "trackers.json").read_text())
    runs = sorted((tmp_path / "wandb-logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(ids["wandb"])
    records = (runs[0] / f"run-{ids['wandb']}.wandb").read_bytes()
    assert b"train_loss" in records and b"my-run" in records
    extended = train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False, **extra), store)
    assert extended.phase("trainer").outputs["steps_trained"] == "2"
    runs = sorted((tmp_path / "wandb-logs" / "wandb").glob("offline-run-*"))
    # The same W&B run id, continued. The folder name has the start second and the id, and W&B adds "-1" when
    # both runs started in the same second; the run file inside names the id either way.
    assert len(runs) == 2 and all((run / f"run-{ids['wandb']}.wandb").is_file() for run in runs), runs


def test_report_to_values_are_checked_with_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_train_config({**BASE, "report_to": "comet_ml"})
    assert any("report_to=comet_ml changes nothing here" in w for w in cfg.warnings)
    assert load_train_config({**BASE, "report_to": "tensorboard"}).warnings == []
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PreconditionError, match=r"report_to=wandb needs the wandb package: pip install") as info:
        load_train_config({**BASE, "report_to": "wandb"})
    assert info.value.field == "report_to"


def test_with_a_remote_output_the_logs_are_copied_under_output_dir(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from stagetune.core.store.local import LocalStore
    from stagetune.trainer.trackers import Trackers

    class RemoteOutput(LocalStore):  # a store with no local folder, as an s3:// output_dir is
        def local_path(self, key: str) -> None:
            return None

    output = RemoteOutput(tmp_path / "bucket")
    cfg = SimpleNamespace(report_to="tensorboard", logging_dir="logs", tracker_project_name="p",
                          tracker_run_name="r")
    trackers = Trackers.start(cfg, output, resumed_step=0, settings={"lora_rank": 4, "validation_resolution": [64]})
    assert trackers is not None
    trackers.log({"train_loss": 0.5}, 1)
    trackers.sync()
    copied = [key for key in output.list("logs/") if "events.out.tfevents" in key]
    assert copied and all(key.startswith("logs/p/") for key in copied)
    trackers.log({"train_loss": 0.25}, 2)
    trackers.finish()
    assert _scalars(tmp_path / "bucket" / "logs")["train_loss"] == [(1, 0.5), (2, 0.25)]

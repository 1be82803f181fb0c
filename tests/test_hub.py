"""push_to_hub against a Hub on loopback: what is published, a token refused or a Hub unreachable said before
training, and a failed push that keeps the weights and is sent by the next run without training."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fixtures_hub import LoopbackHub
from test_end_to_end import make_dataset, train_embedded, write_configs

from stagetune.core.errors import StagetuneError

LORA = "pytorch_lora_weights.safetensors"


def _config(tmp_path: Path, model: Path, steps: int = 2, **extra: object) -> Path:
    return write_configs(tmp_path, model, steps=steps, push_to_hub=True, hub_model_id="me/shapes-lora", **extra)


def test_the_weights_card_and_last_images_are_published(tmp_path: Path, tiny_sd3_path: Path,
                                                        loopback_hub: LoopbackHub) -> None:
    make_dataset(tmp_path / "data")
    run = train_embedded(_config(tmp_path, tiny_sd3_path, steps=4, push_checkpoints_to_hub=True,
                                 model_card_note="Trained on shapes."), str(tmp_path / "store"))
    trained = run.phase("trainer").outputs
    assert trained["steps_trained"] == "4" and trained["hub_commit"].startswith(loopback_hub.url)
    # model_card_private defaults to true in SimpleTuner
    assert loopback_hub.repos == [{"name": "shapes-lora", "organization": "me", "visibility": "private"}]
    files = loopback_hub.files
    assert files[LORA] == (tmp_path / "output" / LORA).read_bytes()
    assert {"checkpoint-2/training_state.json", "checkpoint-4/training_state.json"} <= set(files)
    images = sorted(name for name in files if name.startswith("images/"))
    assert images == ["images/step_4_validation_64x64.png"]  # the last validation, not every one
    assert not any(name.startswith((".stagetune", "validation_images")) for name in files)
    card = files["README.md"].decode()
    assert f"base_model: {tiny_sd3_path}" in card and "- not-for-all-audiences" in card
    assert "rank 4" in card and "Trained on shapes." in card and "pipe.load_lora_weights('me/shapes-lora')" in card
    assert loopback_hub.commits[-1] == "stagetune: step 4"


def test_a_failed_push_keeps_the_weights_and_the_next_run_pushes_without_training(
        tmp_path: Path, tiny_sd3_path: Path, loopback_hub: LoopbackHub) -> None:
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    loopback_hub.fail_commits = True
    with pytest.raises(StagetuneError, match="weights are kept in .*run the same command again") as info:
        train_embedded(_config(tmp_path, tiny_sd3_path, validation=False), store)
    assert "push_to_hub: could not push the weights me/shapes-lora" in str(info.value)
    weights = (tmp_path / "output" / LORA).read_bytes()
    loopback_hub.fail_commits = False
    again = train_embedded(_config(tmp_path, tiny_sd3_path, validation=False), store)
    assert again.phase("trainer").outputs["steps_trained"] == "0"
    assert loopback_hub.files[LORA] == weights
    third = train_embedded(_config(tmp_path, tiny_sd3_path, validation=False), store)
    assert third.already_finished == 2 and len(loopback_hub.commits) == 1  # pushed once, not again


def test_a_refused_token_or_an_unreachable_hub_is_said_before_training(tmp_path: Path, tiny_sd3_path: Path,
                                                                       loopback_hub: LoopbackHub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    loopback_hub.refuse = True
    with pytest.raises(StagetuneError, match="the Hub refused the token \\(HTTP 401\\).*hf auth login"):
        train_embedded(_config(tmp_path, tiny_sd3_path, validation=False), store)
    assert not (tmp_path / "output" / LORA).exists() and not list((tmp_path / "output").glob("checkpoint-*"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(StagetuneError, match=f"127.0.0.1:{closed}: cannot reach the Hub"):
        train_embedded(_config(tmp_path, tiny_sd3_path, validation=False), store)
    assert not (tmp_path / "output" / LORA).exists()

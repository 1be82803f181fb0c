"""Several training processes: N processes at batch b train the weights 1 process trains at batch N·b, and a
killed worker fails the run clearly, after which the same command resumes."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_end_to_end import make_dataset, train_embedded, write_configs

from stagetune.core.client import JobFailed
from stagetune.trainer.distributed import World

LORA = "pytorch_lora_weights.safetensors"


def _configs(root: Path, model: Path, data: Path, *, processes: int, batch: int, steps: int, **extra: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    config = write_configs(root, model, steps=steps, validation=False, num_processes=processes,
                           train_batch_size=batch, lora_dropout=0.0, **{"checkpointing_steps": 0, **extra})
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0]["instance_data_dir"] = str(data)
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    return config


def test_a_global_batch_splits_into_equal_contiguous_shares() -> None:
    items = list(range(6))
    assert [World(rank=r, size=3).slice(items) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert World().slice(items) == items
    with pytest.raises(ValueError, match="does not split over 4"):
        World(rank=0, size=4).slice(items)


def test_two_processes_train_what_one_process_trains_at_twice_the_batch(tmp_path: Path, tiny_sd3_path: Path) -> None:
    data = tmp_path / "data"
    make_dataset(data)
    store = str(tmp_path / "store")
    runs = {}
    for name, processes, batch in (("one", 1, 4), ("two", 2, 2)):
        config = _configs(tmp_path / name, tiny_sd3_path, data, processes=processes, batch=batch, steps=3)
        outputs = train_embedded(config, store).phase("trainer").outputs
        assert outputs["steps"] == "3"
        runs[name] = load_file(tmp_path / name / "output" / LORA)
    one, two = runs["one"], runs["two"]
    assert one.keys() == two.keys()
    moved = max(float(one[k].abs().max()) for k in one if "lora_B" in k)  # lora_B starts at zero
    assert moved > 1e-3, "training moved the weights"
    for key in one:  # equal up to float rounding (other reduction order and thread count), far below the update
        scale = max(float(one[key].abs().max()), 1e-12)
        assert float((one[key] - two[key]).abs().max()) / scale < 1e-3, key


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "stagetune.trainer.worker" in " ".join(p.cmdline())]


def test_a_killed_worker_fails_the_run_clearly_and_the_next_run_resumes(tmp_path: Path, tiny_sd3_path: Path) -> None:
    data = tmp_path / "data"
    make_dataset(data)
    config = _configs(tmp_path, tiny_sd3_path, data, processes=2, batch=1, steps=400, checkpointing_steps=5)
    output = tmp_path / "output"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            train_embedded(config, str(tmp_path / "store"))
        except BaseException as exc:  # noqa: BLE001 - the test reads it below
            failure.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while not list(output.glob("checkpoint-*/training_state.json")) and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    (rank_1,) = [p for p in _workers() if p.environ().get("RANK") == "1"]
    rank_1.send_signal(signal.SIGKILL)  # as the kernel's OOM killer would
    thread.join(timeout=300)
    assert failure and isinstance(failure[0], JobFailed), failure
    message = str(failure[0])
    assert "training process rank 1" in message and "SIGKILL" in message and "resumes" in message, message
    assert not _workers(), "no worker outlives its job"
    saved = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert saved and saved[-1] < 400

    config = _configs(tmp_path, tiny_sd3_path, data, processes=2, batch=1, steps=saved[-1] + 2, checkpointing_steps=5)
    outputs = train_embedded(config, str(tmp_path / "store")).phase("trainer").outputs
    assert outputs["steps"] == str(saved[-1] + 2) and outputs["steps_trained"] == "2"
    assert (output / LORA).exists()


def test_process_counts_follow_accelerates_rules() -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import ConfigError

    base = {"model_family": "sd3", "model_type": "lora", "pretrained_model_name_or_path": "x", "max_train_steps": 1}
    assert load_train_config({**base, "num_processes": 4, "num_machines": 2, "machine_rank": 1}).num_processes == 4
    with pytest.raises(ConfigError) as err:
        load_train_config({**base, "num_processes": 3, "num_machines": 2, "machine_rank": 2})
    assert {p.field for p in err.value.problems} >= {"num_processes"}
    with pytest.raises(ConfigError, match="machine_rank=2 must be below num_machines=2"):
        load_train_config({**base, "num_processes": 4, "num_machines": 2, "machine_rank": 2})
    with pytest.raises(ConfigError, match="num_processes"):
        load_train_config({**base, "num_processes": 0})


def test_the_job_serves_its_workers_step_metrics(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """Prometheus scrapes the trainer service, not its workers: rank 0's step metrics are relayed to it."""
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model_family": "sd3"}) or 0.0

    data = tmp_path / "data"
    make_dataset(data)
    before = value("stagetune_train_samples_total"), value("stagetune_train_steps_total")
    train_embedded(_configs(tmp_path, tiny_sd3_path, data, processes=2, batch=1, steps=3), str(tmp_path / "store"))
    assert value("stagetune_train_samples_total") - before[0] == 6  # 3 steps × 2 processes × batch 1
    assert value("stagetune_train_steps_total") - before[1] == 3
    assert value("stagetune_train_learning_rate") == pytest.approx(1e-3)


FULL = "transformer/diffusion_pytorch_model.safetensors"


def test_fsdp_shards_full_rank_training_and_resumes_bit_for_bit(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """FSDP2 over 2 processes trains the weights 1 process trains at twice the batch; its checkpoints and
    outputs are whole files (diffusers loads them), and a resumed run ends where an uninterrupted one does."""
    from diffusers import SD3Transformer2DModel

    data = tmp_path / "data"
    make_dataset(data)
    store = str(tmp_path / "store")
    full = {"model_type": "full", "learning_rate": 1e-4, "checkpointing_steps": 2, "use_ema": True,
            "ema_decay": 0.9}
    validation = {"validation_steps": 2, "validation_prompt": "a red square", "validation_resolution": "64x64",
                  "validation_num_inference_steps": 2, "ema_validation": "comparison"}
    train_embedded(_configs(tmp_path / "one", tiny_sd3_path, data, processes=1, batch=4, steps=4, **full), store)
    run = train_embedded(_configs(tmp_path / "fsdp", tiny_sd3_path, data, processes=2, batch=2, steps=4,
                                  fsdp_enable=True, **full, **validation), store)
    images = sorted(p.name for p in (tmp_path / "fsdp" / "output" / "validation_images").rglob("*.png"))
    assert len(images) == 4 and sum("ema" in name for name in images) == 2, images  # steps 2 and 4, both kinds
    assert run.phase("trainer").outputs["steps"] == "4"
    one = load_file(tmp_path / "one" / "output" / FULL)
    sharded = load_file(tmp_path / "fsdp" / "output" / FULL)
    ema_one = load_file(tmp_path / "one" / "output" / "ema" / FULL)
    ema_sharded = load_file(tmp_path / "fsdp" / "output" / "ema" / FULL)
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer").state_dict()
    assert one.keys() == sharded.keys() == base.keys()
    for key in one:
        moved = float((one[key] - base[key]).abs().max())
        assert float((one[key] - sharded[key]).abs().max()) <= max(1e-3 * moved, 1e-7), key
        assert float((ema_one[key] - ema_sharded[key]).abs().max()) <= max(1e-3 * moved, 1e-7), key
    assert any(not torch.equal(ema_sharded[k], sharded[k]) for k in sharded)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "fsdp" / "output", subfolder="transformer")
    assert all(torch.equal(loaded.state_dict()[k], sharded[k]) for k in sharded)

    # the same sharded run stopped at its step-2 checkpoint and continued by a new run
    resumed = tmp_path / "resumed"
    train_embedded(_configs(resumed, tiny_sd3_path, data, processes=2, batch=2, steps=2, fsdp_enable=True, **full),
                   store)
    outputs = train_embedded(_configs(resumed, tiny_sd3_path, data, processes=2, batch=2, steps=4, fsdp_enable=True,
                                      **full), store).phase("trainer").outputs
    assert outputs["steps_trained"] == "2"
    for part, straight in ((FULL, sharded), (f"ema/{FULL}", ema_sharded)):
        again = load_file(resumed / "output" / part)
        for key in straight:
            assert torch.equal(again[key], straight[key]), f"{part}: {key} differs after resume"


def test_fsdp_settings_it_cannot_honour_are_refused_by_name() -> None:
    from stagetune.core.config.train import load_train_config
    from stagetune.core.errors import ConfigError, NotSupportedError

    base = {"model_family": "sd3", "model_type": "full", "pretrained_model_name_or_path": "x", "max_train_steps": 1,
            "num_processes": 2, "fsdp_enable": True}
    assert load_train_config(base).fsdp_reshard_after_forward is True  # SimpleTuner's default
    for extra, field in (({"fsdp_version": 1}, "fsdp_version"), ({"model_type": "lora"}, "fsdp_enable"),
                         ({"base_model_precision": "int8-quanto"}, "base_model_precision")):
        with pytest.raises(NotSupportedError) as err:
            load_train_config({**base, **extra})
        assert err.value.field == field or field in {p.field for p in getattr(err.value, "problems", [])}
    with pytest.raises(ConfigError, match="set num_processes to 2 or more"):
        load_train_config({**base, "num_processes": 1})


def test_two_machines_train_one_run_beside_each_other(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """num_machines 2 on loopback: machine 0 holds the run's lock and writes; machine 1's run (the same config,
    machine_rank 1) trains its rank beside it. Together they train what 1 process does at twice the batch."""
    from stagetune.trainer.distributed import free_port

    data = tmp_path / "data"
    make_dataset(data)
    store = str(tmp_path / "store")
    port = free_port()
    machines = {"num_machines": 2, "main_process_ip": "127.0.0.1", "main_process_port": port}
    configs = [_configs(tmp_path / f"machine-{rank}", tiny_sd3_path, data, processes=2, batch=1, steps=3,
                        machine_rank=rank, output_dir=str(tmp_path / "output"), **machines) for rank in (0, 1)]
    results: dict[int, object] = {}

    def run(rank: int) -> None:
        try:
            results[rank] = train_embedded(configs[rank], store).phase("trainer").outputs
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert all(isinstance(results.get(rank), dict) for rank in (0, 1)), results
    assert results[0]["steps"] == results[1]["steps"] == "3"
    train_embedded(_configs(tmp_path / "one", tiny_sd3_path, data, processes=1, batch=2, steps=3), store)
    one, two = load_file(tmp_path / "one" / "output" / LORA), load_file(tmp_path / "output" / LORA)
    for key in one:
        scale = max(float(one[key].abs().max()), 1e-12)
        assert float((one[key] - two[key]).abs().max()) / scale < 1e-3, key


def test_ctrl_c_stops_every_process_after_a_checkpoint(tmp_path: Path, tiny_sd3_path: Path) -> None:
    """Ctrl-C reaches the CLI and its workers (one process group): the workers stop at the same step and rank 0
    saves a checkpoint before the run ends, and no worker is left behind."""
    import os

    from test_end_to_end import cli_until_training

    data = tmp_path / "data"
    make_dataset(data)
    config = _configs(tmp_path, tiny_sd3_path, data, processes=2, batch=1, steps=5000, checkpointing_steps=100000)
    proc, seen, _ = cli_until_training(config, tmp_path / "store")
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "stagetune.trainer.worker" in " ".join(p.cmdline())]
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, "".join(seen)
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "output").glob("checkpoint-*"))
    assert len(saved) == 1 and 0 < saved[0] < 5000, (saved, "".join(seen)[-2000:])
    alive = [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    assert not alive, "a worker outlived the run"


def test_a_worker_given_a_bad_spec_says_which_and_why(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stagetune.trainer.worker import main

    assert main([str(tmp_path / "absent.json")]) == 2
    assert f"cannot read the worker spec {tmp_path / 'absent.json'}" in capsys.readouterr().err
    (tmp_path / "odd.json").write_text(json.dumps({"store": str(tmp_path / "store")}))
    assert main([str(tmp_path / "odd.json")]) == 2
    assert "is not one the trainer wrote (KeyError: 'request')" in capsys.readouterr().err

"""An output_dir is never mixed up: one run at a time, another run's checkpoints never resumed as ours,
a finished run never retrained, and an output that cannot be written refused before any work.

Unit tests of the rules (core/run_settings.py, core/run_lock.py) run without torch; the end-to-end ones
train the tiny SD3 through the five services.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stagetune.core import checkpoints
from stagetune.core.config.train import TrainConfig, load_train_config
from stagetune.core.errors import NotWritableError, OutputInUseError, RunMismatchError
from stagetune.core.run_lock import LOCK_PREFIX, RunLock
from stagetune.core.run_settings import (
    ADAPTER_KEYS,
    MODEL_KEYS,
    NOT_COMPARED,
    RECORD_KEY,
    config_settings,
    decide,
    read_output_state,
    write_record,
)
from stagetune.core.store import open_store
from stagetune.core.store.local import LocalStore
from stagetune.preflight import prepare_run

BASE = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/models/sd3",
        "max_train_steps": 10, "resume_from_checkpoint": "latest"}
DATA = {"samples": 8, "digest": "abc"}


def _settings(**changes: object) -> dict:
    return {**config_settings(load_train_config({**BASE, **changes})), "data": DATA}


def _store_with_checkpoint(tmp_path: Path, settings: dict, step: int = 4) -> LocalStore:
    store = LocalStore(tmp_path / "out", fsync=False)
    checkpoints.save_checkpoint(store, step, {"pytorch_lora_weights.safetensors": b"w" * step},
                                {"sampler": {}, "settings": settings})
    return store


# ------------------------------------------------------------------------------------------ the classes


def test_every_config_field_has_a_class() -> None:
    """A new option must be placed on purpose: compared as model/adapter (refused), training (allowed),
    or not compared because it cannot change the weights."""
    config = load_train_config(BASE)
    classes = config_settings(config)
    placed = set(classes["model"]) | set(classes["adapter"]) | set(classes["training"]) | NOT_COMPARED
    validation = {f for f in TrainConfig.model_fields if f.startswith("validation_")}
    family = set(config.family_options)  # the family's own options: by the same classes
    assert set(TrainConfig.model_fields) - validation == placed - family
    assert {"tokenizer_max_length", "t5_padding"} <= set(classes["model"])
    assert "sd3_clip_uncond_behaviour" in classes["training"]
    assert not {k for k in family if k.startswith("validation_")} & placed
    assert not set(classes["model"]) & set(classes["training"])
    assert {"learning_rate", "lr_scheduler", "max_train_steps", "seed", "train_batch_size"} <= set(classes["training"])
    assert set(ADAPTER_KEYS) == set(classes["adapter"]) and set(MODEL_KEYS) | family >= set(classes["model"])


@pytest.mark.parametrize(("change", "kind"), [
    ({"pretrained_model_name_or_path": "/models/other"}, "model"),
    ({"tokenizer_max_length": 77}, "model"),
    ({"lora_rank": 32}, "adapter"),
    ({"lora_alpha": 8}, "adapter"),
])
def test_another_model_or_adapter_is_refused_naming_what_differs(tmp_path: Path, change: dict, kind: str) -> None:
    store = _store_with_checkpoint(tmp_path, _settings())
    with pytest.raises(RunMismatchError) as info:
        decide(read_output_state(store), _settings(**change), resume_from_checkpoint="latest")
    message = str(info.value)
    key = next(iter(change))
    assert f"with a different {kind}" in message and key in message and str(store.url) in message
    assert "Choose another output_dir" in message and "checkpoint-4" in message
    assert info.value.field == key and info.value.grpc_code == "FAILED_PRECONDITION"


def test_other_data_is_refused(tmp_path: Path) -> None:
    store = _store_with_checkpoint(tmp_path, _settings())
    with pytest.raises(RunMismatchError, match=r"different data:\n    data: 8 samples .* → 9 samples") as info:
        decide(read_output_state(store), {**_settings(), "data": {"samples": 9, "digest": "def"}},
               resume_from_checkpoint="latest")
    assert info.value.field == "data_backend_config"
    # without the data class (the CLI's check before ingest) the same settings pass
    assert decide(read_output_state(store), config_settings(load_train_config(BASE)),
                  resume_from_checkpoint="latest").resume_step == 4


def test_training_settings_may_change_and_are_listed(tmp_path: Path) -> None:
    store = _store_with_checkpoint(tmp_path, _settings())
    decision = decide(read_output_state(store),
                      _settings(learning_rate=5e-5, max_train_steps=20, lr_scheduler="constant", seed=3,
                                train_batch_size=2),
                      resume_from_checkpoint="latest")
    assert decision.resume_step == 4
    changed = {c.key: (c.old, c.new) for c in decision.changes}
    assert changed["learning_rate"] == (4e-7, 5e-5) and changed["max_train_steps"] == (10, 20)
    assert changed["lr_scheduler"] == ("constant_with_warmup", "constant")  # SimpleTuner's default → constant
    assert {"seed", "train_batch_size"} <= set(changed)
    assert all(c.kind == "training" for c in decision.changes)
    assert "learning_rate: 4e-07 → 5e-05" in [str(c) for c in decision.changes]


def test_settings_that_cannot_change_the_weights_are_not_compared(tmp_path: Path) -> None:
    store = _store_with_checkpoint(tmp_path, _settings())
    decision = decide(read_output_state(store),
                      _settings(checkpointing_steps=7, validation_steps=3, vae_batch_size=9, write_batch_size=5),
                      resume_from_checkpoint="latest")
    assert decision.changes == ()


def test_a_fresh_run_on_an_occupied_output_dir_is_refused(tmp_path: Path) -> None:
    store = _store_with_checkpoint(tmp_path, _settings())
    with pytest.raises(RunMismatchError, match="resume_from_checkpoint is not set") as info:
        decide(read_output_state(store), _settings(), resume_from_checkpoint=None)
    assert info.value.field == "resume_from_checkpoint"
    assert decide(read_output_state(LocalStore(tmp_path / "empty")), _settings(),
                  resume_from_checkpoint=None).resume_step is None


def test_weights_without_a_checkpoint_are_never_overwritten(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out", fsync=False)
    store.put_bytes("pytorch_lora_weights.safetensors", b"someone's weights")
    with pytest.raises(RunMismatchError, match="no checkpoint to continue from: a new run would overwrite it"):
        decide(read_output_state(store), _settings(), resume_from_checkpoint="latest")


def test_finished_runs_are_recognised(tmp_path: Path) -> None:
    store = _store_with_checkpoint(tmp_path, _settings(), step=10)
    state = read_output_state(store)
    assert state.finished_step is None  # checkpoints but no final weights and record yet
    store.put_bytes("pytorch_lora_weights.safetensors", b"final")
    write_record(store, state="finished", step=10, total_steps=10, settings=_settings())
    assert read_output_state(store).finished_step == 10
    write_record(store, state="running", step=10, total_steps=20, settings=_settings())
    assert read_output_state(store).finished_step is None
    assert json.loads(store.get_bytes(RECORD_KEY))["state"] == "running"


# ------------------------------------------------------------------------------------------ the lock


def test_one_run_at_a_time(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out", fsync=False)
    first = RunLock(store, ttl=5).acquire()
    with pytest.raises(OutputInUseError) as info:
        RunLock(store, ttl=5).acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in str(info.value) and info.value.field == "output_dir"
    first.release()
    RunLock(store, ttl=5).acquire().release()
    assert not list(store.list(f"{LOCK_PREFIX}/leases/run/claim-"))  # nothing left behind


def _claim(store: LocalStore, owner: str, **body: object) -> None:
    claim = {"format": "stagetune-lease/1", "owner": owner, "unit": "run", "state": "ready", "number": 1,
             "beat": 0, "ttl": 5.0, **body}
    store.put_bytes(f"{LOCK_PREFIX}/leases/run/claim-{owner}.json", json.dumps(claim).encode())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_crashed_runs_lock_is_taken_over(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out", fsync=False)
    _claim(store, "crashed", host=socket.gethostname(), pid=_dead_pid(), written_at=time.time())
    RunLock(store, ttl=5).acquire().release()  # same host, no such process: at once
    _claim(store, "elsewhere", host="other-node", pid=1, written_at=time.time() - 11)
    RunLock(store, ttl=5).acquire().release()  # another host, silent for over 2 ttl
    _claim(store, "alive", host="other-node", pid=1, written_at=time.time())
    with pytest.raises(OutputInUseError, match="pid 1 on other-node"):
        RunLock(store, ttl=5).acquire()


def test_the_client_hands_its_lock_to_the_trainer(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out", fsync=False)
    client = RunLock(store, ttl=5).acquire()
    trainer = RunLock(store, owner=client.owner, ttl=5).adopt_or_acquire()
    assert trainer.adopted and trainer.holder() is None
    trainer.release()  # the adopter stops renewing; the lock stays the client's
    with pytest.raises(OutputInUseError):
        RunLock(store, ttl=5).acquire()
    client.release()
    RunLock(store, ttl=5).acquire().release()


def test_the_lock_works_on_s3(s3_store_url: str) -> None:
    store = open_store(s3_store_url)
    first = RunLock(store, ttl=5).acquire()
    with pytest.raises(OutputInUseError):
        RunLock(store, ttl=5).acquire()
    first.release()
    RunLock(store, ttl=5).acquire().release()


# ------------------------------------------------------------------------ outputs that cannot be written


def _configs(tmp_path: Path, model: Path, **config: object) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        {"id": "d", "instance_data_dir": str(data)},
        {"id": "t", "dataset_type": "text_embeds", "default": True},
    ]))
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "pretrained_model_name_or_path": str(model),
                                "output_dir": str(tmp_path / "output"),
                                "data_backend_config": str(tmp_path / "multidatabackend.json"), **config}))
    return path


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    return folder


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Permission bits bind root only through another effective uid (CI runs as root)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_output_dir_that_is_a_file(tmp_path: Path, model_folder: Path) -> None:
    config = _configs(tmp_path, model_folder)
    (tmp_path / "output").write_text("not a folder")
    with pytest.raises(NotWritableError, match=r"output_dir .*output.* is a file, not a folder") as info:
        prepare_run(config, store=LocalStore(tmp_path / "store"))
    assert info.value.field == "output_dir"
    assert (tmp_path / "output").read_text() == "not a folder"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user can read (pytest's tmp_path is root-only), for tests run as another user."""
    folder = Path(tempfile.mkdtemp(prefix="stagetune-ro-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_read_only_output_dir_fails_before_any_work(open_dir: Path) -> None:
    model = open_dir / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    config = _configs(open_dir, model)
    (open_dir / "output").mkdir()
    (open_dir / "output").chmod(0o555)
    (open_dir / "store").mkdir()
    (open_dir / "store").chmod(0o777)
    try:
        with unprivileged(), pytest.raises(NotWritableError, match="permission denied") as info:
            prepare_run(config, store=LocalStore(open_dir / "store"))
    finally:
        (open_dir / "output").chmod(0o755)
    assert info.value.field == "output_dir" and str(open_dir / "output") in str(info.value)
    assert [p.name for p in (open_dir / "store").iterdir()] == []  # no ingest, nothing written


def test_read_only_mount(tmp_path: Path, model_folder: Path) -> None:
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only file system here: {done.stderr.decode().strip()}")
    try:
        config = _configs(tmp_path, model_folder, output_dir=str(mount / "output"))
        with pytest.raises(NotWritableError, match="read-only file system"):
            prepare_run(config, store=LocalStore(tmp_path / "store"))
        with pytest.raises(NotWritableError, match="store .* is a read-only file system") as info:
            prepare_run(_configs(tmp_path, model_folder), store=LocalStore(mount / "store"))
        assert info.value.field == "store"
        # the LocalStore itself names a read-only file system it meets while writing
        with pytest.raises(NotWritableError, match="Read-only file system"):
            LocalStore(mount / "store").put_bytes("a", b"1")
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ------------------------------------------------------------------------------ through the services


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".stagetune" not in p.parts}


def test_second_run_on_an_output_dir(tmp_path: Path, tiny_sd3_path: Path) -> None:
    from PIL import Image
    from test_end_to_end import make_dataset, train_embedded, write_configs

    make_dataset(tmp_path / "data")
    store = str(tmp_path / "store")
    config = write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False)
    first = train_embedded(config, store)
    assert first.phase("trainer").outputs["steps_trained"] == "4"
    output = tmp_path / "output"
    before = _snapshot(output)

    # the same command: finished, said so, nothing trained or rewritten
    again = train_embedded(config, store)
    assert again.already_finished == 4 and [p.name for p in again.phases] == ["ingest"]
    assert _snapshot(output) == before

    # another adapter shape: refused before ingest, naming the key
    with pytest.raises(RunMismatchError, match="lora_rank: 4 → 8"):
        train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False, lora_rank=8), store)
    # another model (same weights under another name is another model to the user's tools)
    alias = tmp_path / "model-alias"
    alias.symlink_to(tiny_sd3_path)
    with pytest.raises(RunMismatchError, match="different model"):
        train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False,
                                     pretrained_model_name_or_path=str(alias)), store)
    # other data: refused after ingest, before any encoding or training
    config = write_configs(tmp_path, tiny_sd3_path, steps=4, validation=False)  # (each call rewrites config.json)
    Image.new("RGB", (96, 96), (9, 9, 9)).save(tmp_path / "data" / "extra.png")
    (tmp_path / "data" / "extra.txt").write_text("one more picture")
    events: list[str] = []
    with pytest.raises(RunMismatchError, match=r"different data:\n    data: 8 samples .* → 9 samples"):
        from stagetune.pipeline import run_training, start_embedded

        servers = start_embedded(open_store(store))
        try:
            run_training(config, {n: s.address for n, s in servers.items()},
                         on_event=lambda phase, event: events.append(phase))
        finally:
            for server in servers.values():
                server.stop(0)
    assert set(events) == {"ingest"}
    assert _snapshot(output) == before
    (tmp_path / "data" / "extra.png").unlink()
    (tmp_path / "data" / "extra.txt").unlink()

    # training settings changed: resumed from checkpoint-4, the changes printed and recorded
    more = train_embedded(write_configs(tmp_path, tiny_sd3_path, steps=6, validation=False, learning_rate=5e-4),
                          store)
    outputs = more.phase("trainer").outputs
    assert (outputs["steps"], outputs["steps_trained"]) == ("6", "2")
    assert outputs["changed_settings"] == "learning_rate: 0.001 → 0.0005; max_train_steps: 4 → 6"
    assert more.changed_settings == ["learning_rate: 0.001 → 0.0005", "max_train_steps: 4 → 6"]
    record = json.loads((output / ".stagetune" / "run.json").read_text())
    assert record["state"] == "finished" and record["step"] == 6
    assert record["changed_settings"] == more.changed_settings
    assert not list((output / ".stagetune").rglob("claim-*"))  # the lock is gone with the run


def test_prepare_run_holds_the_lock_until_closed(tmp_path: Path, model_folder: Path) -> None:
    config = _configs(tmp_path, model_folder)
    plan = prepare_run(config, store=LocalStore(tmp_path / "store"))
    with pytest.raises(OutputInUseError, match="is in use by another run"):
        prepare_run(config, store=LocalStore(tmp_path / "store"))
    plan.close()
    prepare_run(config, store=LocalStore(tmp_path / "store")).close()


def test_an_s3_output_dir_is_locked_and_checked_too(tmp_path: Path, model_folder: Path, s3_server) -> None:
    from fixtures_store import fresh_bucket

    output = s3_server.url(fresh_bucket(), prefix="runs/one")
    config = _configs(tmp_path, model_folder, output_dir=output)
    plan = prepare_run(config, store=LocalStore(tmp_path / "store"))
    assert plan.output.url.startswith("s3://")
    with pytest.raises(OutputInUseError, match="is in use by another run"):
        prepare_run(config, store=LocalStore(tmp_path / "store"))
    plan.close()
    store = open_store(output)
    made_by = config_settings(load_train_config({**BASE, "pretrained_model_name_or_path": str(model_folder)}))
    checkpoints.save_checkpoint(store, 3, {"pytorch_lora_weights.safetensors": b"w"},
                                {"sampler": {}, "settings": made_by})
    with pytest.raises(RunMismatchError, match="lora_rank: 16 → 8"):
        prepare_run(_configs(tmp_path, model_folder, output_dir=output, lora_rank=8, lora_alpha=16),
                    store=LocalStore(tmp_path / "store"))
    config = _configs(tmp_path, model_folder, output_dir=output)  # (rewrites config.json) the same settings resume
    resumed = prepare_run(config, store=LocalStore(tmp_path / "store"))
    resumed.close()
    assert resumed.decision.resume_step == 3


def test_training_into_an_s3_output_dir(tmp_path: Path, tiny_sd3_path: Path, s3_server) -> None:
    from fixtures_store import fresh_bucket
    from test_end_to_end import make_dataset, train_embedded, write_configs

    make_dataset(tmp_path / "data")
    output = s3_server.url(fresh_bucket(), prefix="runs/first")
    config = write_configs(tmp_path, tiny_sd3_path, steps=2, output_dir=output)  # with validation images
    run = train_embedded(config, str(tmp_path / "store"))
    assert run.phase("trainer").outputs["output"].startswith("s3://")
    store = open_store(output)
    keys = set(store.list(""))
    assert {"pytorch_lora_weights.safetensors", "checkpoint-2/training_state.json", RECORD_KEY,
            "validation_images/step_2_validation_64x64.png"} <= keys
    assert not [k for k in keys if "claim-" in k]  # the run lock is released
    assert not list(Path.cwd().glob("s3:*"))
    assert train_embedded(config, str(tmp_path / "store")).already_finished == 2


def test_sub_folders_of_outputs_keep_url_options() -> None:
    from stagetune.core.outputs import join_output, output_location

    url = "s3://bucket/runs/one/?endpoint=http://127.0.0.1:9000&access_key=a"
    assert join_output(url, "validation_images") == (
        "s3://bucket/runs/one/validation_images?endpoint=http://127.0.0.1:9000&access_key=a")
    assert join_output("/data/out", "validation_images") == "/data/out/validation_images"
    assert output_location("out", Path("/base")) == "/base/out" and output_location(url) == url

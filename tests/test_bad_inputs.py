"""A corpus of bad inputs: each gets its exact error class (and field), and loses or changes no file.

Every case starts from the same good workspace — a dataset with captions, a store holding a previous
run's cache, and an output_dir holding a previous run's checkpoint — breaks one thing, runs the step a
user or a client would run (the CLI's preflight, ingest, a service's Start check, a store read), and
checks the error and that every file of the dataset, the store and the output is still there, unchanged.
No torch model is loaded: these are the checks that must answer before any work.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from stagetune.core import checkpoints, errors
from stagetune.core.cache import ShardedCache
from stagetune.core.config.dataset import load_data_backend_config
from stagetune.core.jobs import JobManager
from stagetune.core.leases import lease_ttl
from stagetune.core.run_lock import RunLock
from stagetune.core.run_settings import config_settings
from stagetune.core.store import open_store
from stagetune.core.store.local import LocalStore
from stagetune.ingest.run import run_ingest
from stagetune.preflight import prepare_run
from stagetune.v1 import common_pb2, ingest_pb2, trainer_pb2, vae_pb2

CONFIG = {
    "model_type": "lora", "model_family": "sd3", "seed": 1, "max_train_steps": 4, "train_batch_size": 1,
    "learning_rate": 1e-4, "optimizer": "adamw", "resume_from_checkpoint": "latest", "lora_rank": 4,
}


class Workspace:
    """A good run's files; cases break one thing and call `run`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.data.mkdir()
        for i, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 120))):
            Image.new("RGB", (128, 128), colour).save(self.data / f"img{i}.png")
            (self.data / f"img{i}.txt").write_text(f"a plain colour number {i}")
        self.model = root / "model"
        self.model.mkdir()
        (self.model / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
        self.store = LocalStore(root / "store", fsync=False)
        self.output = root / "output"
        self.backends = [{"id": "colours", "instance_data_dir": str(self.data), "caption_strategy": "textfile",
                          "resolution": 64, "resolution_type": "pixel_area", "crop": True},
                         {"id": "text", "dataset_type": "text_embeds", "default": True}]
        self.config = {**CONFIG, "pretrained_model_name_or_path": str(self.model), "output_dir": str(self.output),
                       "data_backend_config": str(root / "multidatabackend.json")}
        # what a previous run left: a manifest and a cache shard in the store, a checkpoint in output_dir
        self.ingest()
        cache = ShardedCache(self.store, "cache/vae/previous")
        with cache.writer(1) as writer:
            import torch

            writer.add("a-latent", {"latents": torch.zeros(4, 8, 8)})
        checkpoints.save_checkpoint(
            LocalStore(self.output, fsync=False), 2, {"pytorch_lora_weights.safetensors": b"weights"},
            {"sampler": {}, "settings": {**config_settings(self._loaded()), "data": {"samples": 4, "digest": "d"}}})
        self.write()

    def _loaded(self) -> Any:
        from stagetune.core.config.train import load_train_config

        return load_train_config(self.config)

    def write(self) -> None:
        (self.root / "config.json").write_text(json.dumps(self.config))
        (self.root / "multidatabackend.json").write_text(json.dumps(self.backends))

    def ingest(self, **kwargs: Any) -> Any:
        return run_ingest(load_data_backend_config(self.backends, base_dir=self.root), self.store,
                          **{"train_batch_size": 1, **kwargs})

    def preflight(self, store: Any = None) -> None:
        self.write()
        prepare_run(self.root / "config.json", store=store or self.store).close()

    def snapshot(self) -> dict[str, bytes]:
        files = {}
        for folder in (self.data, self.root / "store", self.output):
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[str(path.relative_to(self.root))] = path.read_bytes()
        return files


@dataclass
class Case:
    name: str
    act: Callable[[Workspace], Any]
    error: type[errors.StagetuneError]
    field: str | None = None
    says: str = ""


def config(**changes: Any) -> Callable[[Workspace], Any]:
    def act(ws: Workspace) -> None:
        for key, value in changes.items():
            if value is DROP:
                ws.config.pop(key, None)
            else:
                ws.config[key] = value
        ws.preflight()

    return act


def dataset(**changes: Any) -> Callable[[Workspace], Any]:
    def act(ws: Workspace) -> None:
        for key, value in changes.items():
            if value is DROP:
                ws.backends[0].pop(key, None)
            else:
                ws.backends[0][key] = value
        ws.preflight()

    return act


DROP = object()


def raw_config(text: str) -> Callable[[Workspace], Any]:
    def act(ws: Workspace) -> None:
        (ws.root / "config.json").write_text(text)
        prepare_run(ws.root / "config.json", store=ws.store)

    return act


def raw_backends(text: str) -> Callable[[Workspace], Any]:
    def act(ws: Workspace) -> None:
        ws.write()
        (ws.root / "multidatabackend.json").write_text(text)
        prepare_run(ws.root / "config.json", store=ws.store)

    return act


def _files(ws: Workspace, build: Callable[[Path], None]) -> Callable[[Workspace], Any]:
    return lambda ws: (build(ws.data), ws.ingest())


def _replace_data(ws: Workspace, write: Callable[[Path, int], None]) -> None:
    for path in list(ws.data.iterdir()):
        path.unlink()
    for i in range(3):
        write(ws.data, i)
    ws.ingest()


def _empty(ws: Workspace) -> None:
    empty = ws.root / "empty"
    empty.mkdir()
    ws.backends[0]["instance_data_dir"] = str(empty)
    ws.ingest()


def _other_dataset(ws: Workspace, write: Callable[[Path, int], None], count: int = 3, **entry: Any) -> None:
    folder = ws.root / "other"
    folder.mkdir()
    for i in range(count):
        write(folder, i)
    ws.backends[0] = {**ws.backends[0], "instance_data_dir": str(folder), **entry}
    ws.ingest()


def _corrupt(folder: Path, i: int) -> None:
    (folder / f"bad{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a whole JPEG")


def _tiny(folder: Path, i: int) -> None:
    Image.new("RGB", (16, 16), (i, i, i)).save(folder / f"tiny{i}.png")


def _latin1_caption(folder: Path, i: int) -> None:
    Image.new("RGB", (128, 128), (i * 40, 0, 0)).save(folder / f"c{i}.png")
    (folder / f"c{i}.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))


def _lock_held(ws: Workspace) -> None:
    RunLock(LocalStore(ws.output, fsync=False), ttl=30).acquire()  # another live run in this process
    ws.preflight()


def _weights_only(ws: Workspace) -> None:
    other = ws.root / "elsewhere"
    other.mkdir()
    (other / "pytorch_lora_weights.safetensors").write_bytes(b"someone's LoRA")
    ws.config["output_dir"] = str(other)
    ws.preflight()
    # the check left that output untouched too
    assert (other / "pytorch_lora_weights.safetensors").read_bytes() == b"someone's LoRA"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer_start(ws: Workspace, **request: Any) -> None:
    from stagetune.trainer.service import validator

    ws.write()
    base = {"config_json": json.dumps(ws.config), "manifest_id": "m", "latent_cache": "c", "text_cache": "c",
            "latent_keys": "k", "text_keys": "k"}
    validator(ws.store)(trainer_pb2.StartTrainingRequest(**{**base, **request}))


def _vae_start(ws: Workspace, **request: Any) -> None:
    from stagetune.vae.service import validator

    model = common_pb2.ModelRef(name_or_path=str(ws.model), family="sd3")
    validator(ws.store)(vae_pb2.StartEncodeLatentsRequest(**{"model": model, **request}))


def _ingest_start(ws: Workspace, **request: Any) -> None:
    from stagetune.ingest.service import validate

    validate(ingest_pb2.StartIngestRequest(**{"data_backend_config_json": json.dumps(ws.backends), **request}))


def _corrupt_record(ws: Workspace) -> None:
    ws.store.put_bytes("jobs/ingest-broken/record.json", b'{"job_id": ')
    JobManager("ingest", ws.store, lambda ctx: {}).get("ingest-broken")


def _corrupt_index(ws: Workspace) -> None:
    (ws.root / "store" / "cache" / "vae" / "previous" / "index" / "zz-broken.json").write_text("{not json")
    ShardedCache(ws.store, "cache/vae/previous").refresh()


def _missing_checkpoint(ws: Workspace) -> None:
    ws.config["resume_from_checkpoint"] = str(ws.root / "old-run" / "checkpoint-7")
    from stagetune.core.checkpoints import resolve_resume

    resolve_resume(LocalStore(ws.output), ws.config["resume_from_checkpoint"])


def _bad_ttl(ws: Workspace) -> None:
    os.environ["STAGETUNE_LEASE_TTL_S"] = "soon"
    try:
        lease_ttl()
    finally:
        del os.environ["STAGETUNE_LEASE_TTL_S"]


CASES = [
    # config.json
    Case("config is not JSON", raw_config("{model_type: lora"), errors.ConfigError, "config", "not valid JSON"),
    Case("config is a list", raw_config("[]"), errors.ConfigError, "config", "got a list"),
    Case("config is a string", raw_config('"sd3"'), errors.ConfigError, "config", "got a string"),
    Case("config file missing", lambda ws: prepare_run(ws.root / "nope.json", store=ws.store), errors.ConfigError,
         "config", "not found"),
    Case("config path is a folder", lambda ws: prepare_run(ws.data, store=ws.store), errors.ConfigError,
         "config", "is a folder"),
    Case("misspelt key", config(learnig_rate=1e-4), errors.ConfigError, "learnig_rate", "did you mean"),
    Case("option not built yet", config(base_model_precision="int8-torchao"), errors.NotSupportedError,
         "base_model_precision", "not supported yet"),
    Case("wrong type", config(train_batch_size="two"), errors.ConfigError, "train_batch_size", "integer"),
    Case("negative batch size", config(train_batch_size=-1), errors.ConfigError, "train_batch_size"),
    Case("zero LoRA rank", config(lora_rank=0), errors.ConfigError, "lora_rank"),
    Case("unset environment variable", config(output_dir="{env:STAGETUNE_NOT_SET_ANYWHERE}"),
         errors.ConfigError, "output_dir", "STAGETUNE_NOT_SET_ANYWHERE"),
    Case("no length at all", config(max_train_steps=0, num_train_epochs=0), errors.ConfigError,
         "max_train_steps"),
    Case("learning rate not a number", config(learning_rate="fast"), errors.ConfigError, "learning_rate",
         "expected a number"),
    Case("prompt library missing", config(user_prompt_library="/nowhere/library.json"), errors.ConfigError,
         "user_prompt_library", "not found"),
    Case("bad validation resolution", config(validation_resolution="huge"), errors.ConfigError,
         "validation_resolution"),
    Case("several problems at once", config(learnig_rate=1, lora_rank=0), errors.ConfigProblems, "learnig_rate",
         "2 problems"),
    Case("no model path", config(pretrained_model_name_or_path=DROP), errors.ConfigError,
         "pretrained_model_name_or_path", "required"),
    # the model
    Case("model folder missing", config(pretrained_model_name_or_path="/nowhere/model"), errors.NotFoundError,
         "pretrained_model_name_or_path", "does not exist"),
    Case("model path is a file", lambda ws: config(pretrained_model_name_or_path=str(ws.model / "model_index.json"))(
        ws), errors.InputError, "pretrained_model_name_or_path", "is a file"),
    Case("model folder is not diffusers", lambda ws: config(pretrained_model_name_or_path=str(ws.data))(ws),
         errors.InputError, "pretrained_model_name_or_path", "model_index.json"),
    # multidatabackend.json
    Case("backend config is not JSON", raw_backends("[{"), errors.ConfigError, "data_backend_config",
         "not valid JSON"),
    Case("backend config is an object", raw_backends("{}"), errors.ConfigError, "data_backend_config",
         "got an object"),
    Case("backend config missing", config(data_backend_config="/nowhere/multidatabackend.json"), errors.ConfigError,
         "data_backend_config", "not found"),
    Case("dataset without a folder", dataset(instance_data_dir=DROP), errors.ConfigError, "instance_data_dir"),
    Case("dataset id twice", lambda ws: (ws.backends.insert(1, dict(ws.backends[0])), ws.preflight()),
         errors.ConfigError, "id", "used twice"),
    Case("no text_embeds entry", lambda ws: (ws.backends.pop(), ws.preflight()), errors.ConfigError,
         "dataset_type", "text_embeds"),
    Case("misspelt dataset key", dataset(resolutoin=512), errors.ConfigError, "resolutoin", "did you mean"),
    Case("dataset folder missing", dataset(instance_data_dir="/nowhere/images"), errors.NotFoundError,
         "instance_data_dir", "does not exist"),
    Case("dataset folder is a file", lambda ws: dataset(instance_data_dir=str(ws.data / "img0.png"))(ws),
         errors.InputError, "instance_data_dir", "is a file"),
    Case("closest crop without buckets", dataset(crop_aspect="closest"), errors.ConfigError,
         "crop_aspect_buckets"),
    Case("negative repeats", dataset(repeats=-1), errors.ConfigError, "repeats"),
    Case("crop style not built yet", dataset(crop_style="face"), errors.NotSupportedError, "crop_style"),
    # the output_dir
    Case("output_dir is a file", lambda ws: (ws.data.joinpath("img0.txt"), config(
        output_dir=str(ws.data / "img0.txt"))(ws)), errors.NotWritableError, "output_dir", "is a file"),
    Case("output_dir in use", _lock_held, errors.OutputInUseError, "output_dir", "in use by another run"),
    Case("another adapter's checkpoints", config(lora_rank=16), errors.RunMismatchError, "lora_rank",
         "lora_rank: 4 → 16"),
    Case("another model's checkpoints", lambda ws: (
        (ws.root / "model2").mkdir(), (ws.root / "model2" / "model_index.json").write_text("{}"),
        config(pretrained_model_name_or_path=str(ws.root / "model2"))(ws)), errors.RunMismatchError,
        "pretrained_model_name_or_path", "different model"),
    Case("fresh run over checkpoints", config(resume_from_checkpoint="none"), errors.RunMismatchError,
         "resume_from_checkpoint", "resume_from_checkpoint is not set"),
    Case("weights without checkpoints", _weights_only, errors.RunMismatchError, "output_dir", "overwrite"),
    # the store
    Case("store URL scheme", lambda ws: ws.preflight(open_store("ftp://host/bucket")), errors.ConfigError, "store",
         "unsupported scheme"),
    Case("store URL option", lambda ws: ws.preflight(open_store("s3://bucket?endpont=http://127.0.0.1:1")),
         errors.ConfigError, "store", "endpont"),
    Case("store unreachable", lambda ws: ws.preflight(open_store(
        f"s3://bucket?endpoint=http://127.0.0.1:{_closed_port()}&retries=0&access_key=a&secret_key=b")),
         errors.StoreUnavailableError, "store", "cannot reach"),
    Case("store is a file", lambda ws: ws.preflight(LocalStore(ws.data / "img1.png")), errors.NotWritableError,
         "store", "is a file, not a folder"),
    Case("corrupt job record", _corrupt_record, errors.CorruptError, "job_id", "unreadable"),
    Case("corrupt cache index", _corrupt_index, errors.CorruptError, "cache", "not valid JSON"),
    Case("resume from a missing checkpoint", _missing_checkpoint, errors.NotFoundError, "resume_from_checkpoint"),
    Case("lease ttl not a number", _bad_ttl, errors.ConfigError, "STAGETUNE_LEASE_TTL_S"),
    # datasets with nothing to train on (ingest, before any encoder)
    Case("empty dataset", _empty, errors.InputError, "colours", "no image files"),
    Case("every file corrupt", lambda ws: _other_dataset(ws, _corrupt), errors.InputError, "colours",
         "bad0.jpg: truncated JPEG"),
    Case("every image too small", lambda ws: _other_dataset(ws, _tiny, minimum_image_size=64), errors.InputError,
         "colours", "tiny0.png:"),
    Case("every bucket too small for a batch", lambda ws: ws.ingest(train_batch_size=8), errors.InputError,
         "colours", "repeats ≥ 1 would keep it"),
    Case("caption not UTF-8", lambda ws: _other_dataset(ws, _latin1_caption), errors.InputError, None,
         "not UTF-8"),
    # service requests (the checks Start runs before a job exists)
    Case("trainer: config is a list", lambda ws: _trainer_start(ws, config_json="[]"), errors.Problems,
         "config_json", "got a list"),
    Case("trainer: manifest missing", lambda ws: _trainer_start(ws), errors.Problems, "manifest_id",
         "run ingest first"),
    Case("trainer: output in use", lambda ws: (_lock_held_only(ws), _trainer_start(ws, manifest_id="x")),
         errors.Problems, "manifest_id", "in use by another run"),
    Case("vae: negative batch", lambda ws: _vae_start(ws, manifest_id="nope", vae_batch_size=-3),
         errors.Problems, "vae_batch_size"),
    Case("ingest: defaults not an object", lambda ws: _ingest_start(ws, dataset_defaults_json="[]"),
         errors.InputError, "dataset_defaults_json"),
]


def _lock_held_only(ws: Workspace) -> None:
    RunLock(LocalStore(ws.output, fsync=False), ttl=30).acquire()


def test_the_corpus_is_large_and_names_are_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    before = ws.snapshot()
    with pytest.raises(errors.StagetuneError) as info:
        case.act(ws)
    error = info.value
    assert type(error) is case.error, f"{type(error).__name__}: {error}"
    if case.field is not None:
        assert error.field == case.field or case.field in {p.field for p in error.problems}, (error.field, error)
    assert case.says in str(error), str(error)
    assert "Traceback" not in str(error)
    after = ws.snapshot()
    lost_or_changed = [name for name, data in before.items() if after.get(name) != data]
    assert lost_or_changed == [], lost_or_changed

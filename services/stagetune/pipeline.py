"""The training pipeline as a client of the five services: ingest → (vae ∥ text) → trainer.

`start_embedded` hosts all five servers in this one interpreter (real gRPC on loopback ports, one
copy of torch and of the shared frozen weights); `run_training` drives any set of endpoints, so the
same code drives a cluster's services.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from stagetune.core.client import call, follow
from stagetune.core.errors import InputError, NotFoundError
from stagetune.core.grpc_server import RunningServer, start_server
from stagetune.core.store.base import Store
from stagetune.v1 import (
    common_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    text_pb2,
    text_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICES = ("ingest", "vae", "text", "trainer", "validation")

def service_binding(name: str, store: Store) -> Any:
    if name not in SERVICES:
        raise InputError(f"unknown service {name!r}: choose one of {', '.join(SERVICES)}", field="service")
    module = __import__(f"stagetune.{name}.service", fromlist=["binding"])
    return module.binding(store)


def start_embedded(store: Store, host: str = "127.0.0.1") -> dict[str, RunningServer]:
    """One server per service, each on its own free loopback port."""
    return {name: start_server([service_binding(name, store)], host=host) for name in SERVICES}


@dataclasses.dataclass
class PhaseResult:
    name: str
    seconds: float
    outputs: dict[str, str]


@dataclasses.dataclass
class TrainingRun:
    phases: list[PhaseResult] = dataclasses.field(default_factory=list)

    def phase(self, name: str) -> PhaseResult:
        return next(p for p in self.phases if p.name == name)


EventSink = Callable[[str, common_pb2.Event], None]


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{what} not found: {path}", field=what) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}", field=what) from None


def find_data_backend_config(cfg: Any, explicit: str | None, config_path: Path) -> Path:
    candidate = explicit or getattr(cfg, "data_backend_config", None)
    if not candidate:
        default = config_path.parent / "multidatabackend.json"
        if default.exists():
            return default
        raise InputError("no data_backend_config: set it in config.json or pass --data_backend_config",
                         field="data_backend_config")
    path = Path(candidate).expanduser()
    if not path.is_absolute() and not path.exists() and (config_path.parent / path).exists():
        path = config_path.parent / path
    return path


def run_training(
    config_path: Path,
    endpoints: dict[str, str],
    *,
    data_backend_config: str | None = None,
    on_event: EventSink = lambda phase, event: None,
    on_phase: Callable[[PhaseResult], None] = lambda result: None,
) -> TrainingRun:
    """Drive one training run through the services; raises the service's own error on failure."""
    from stagetune.core.config.train import load_train_config

    base_dir = Path(os.getcwd())
    raw_config = read_json(config_path, "config")
    cfg = load_train_config(raw_config, base_dir=base_dir)  # fail fast, before any service works
    backend_path = find_data_backend_config(cfg, data_backend_config, config_path)
    backends_json = json.dumps(read_json(backend_path, "data_backend_config"))
    run_id = uuid.uuid4().hex[:12]
    run = TrainingRun()
    channels = {name: grpc.insecure_channel(address) for name, address in endpoints.items()}
    try:
        ingest = ingest_pb2_grpc.IngestServiceStub(channels["ingest"])
        vae = vae_pb2_grpc.VaeServiceStub(channels["vae"])
        text = text_pb2_grpc.TextServiceStub(channels["text"])
        trainer = trainer_pb2_grpc.TrainerServiceStub(channels["trainer"])

        def phase(name: str, stub: Any, request: Any) -> PhaseResult:
            started = time.perf_counter()
            job = call(stub.Start, request)
            try:
                job = follow(stub, job, lambda event: on_event(name, event))
            except KeyboardInterrupt:
                # Ctrl-C: let the job stop cleanly (the trainer saves a checkpoint) before we exit.
                call(stub.Cancel, common_pb2.CancelJobRequest(job_id=job.job_id))
                with contextlib.suppress(Exception):
                    follow(stub, job)
                raise
            result = PhaseResult(name, time.perf_counter() - started, dict(job.outputs))
            on_phase(result)
            return result

        defaults = cfg.dataset_defaults()
        ingested = phase("ingest", ingest, ingest_pb2.StartIngestRequest(
            request_id=f"{run_id}-ingest", data_backend_config_json=backends_json,
            dataset_defaults_json=json.dumps(defaults), base_dir=str(base_dir),
            train_batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            world_size=1, seed=cfg.seed or 0, allow_dataset_oversubscription=cfg.allow_dataset_oversubscription,
        ))
        run.phases.append(ingested)
        manifest_id = ingested.outputs["manifest_id"]
        model = common_pb2.ModelRef(name_or_path=cfg.pretrained_model_name_or_path, revision=cfg.revision or "",
                                    family=cfg.model_family)
        prompts = [cfg.validation_prompt, cfg.validation_negative_prompt]
        extra = [] if cfg.validation_disable else [p for p in prompts if p]
        with ThreadPoolExecutor(max_workers=2) as pool:
            latents = pool.submit(phase, "vae", vae, vae_pb2.StartEncodeLatentsRequest(
                request_id=f"{run_id}-vae", manifest_id=manifest_id, model=model,
                vae_batch_size=cfg.vae_batch_size, write_batch_size=cfg.write_batch_size,
                data_backend_config_json=backends_json, base_dir=str(base_dir),
                keys_only=cfg.vae_cache_ondemand or cfg.vae_cache_disable,
            ))
            texts = pool.submit(phase, "text", text, text_pb2.StartEncodeTextRequest(
                request_id=f"{run_id}-text", manifest_id=manifest_id, extra_captions=extra, model=model,
                max_sequence_length=cfg.tokenizer_max_length, t5_padding=cfg.t5_padding,
                batch_size=cfg.text_encoder_batch_size,
                write_batch_size=int(ingested.outputs.get("text_write_batch_size") or cfg.write_batch_size),
                keys_only=cfg.text_cache_ondemand or cfg.text_cache_disable,
            ))
            latent_result, text_result = latents.result(), texts.result()
        run.phases += [latent_result, text_result]
        trained = phase("trainer", trainer, trainer_pb2.StartTrainingRequest(
            request_id=f"{run_id}-trainer", config_json=json.dumps(raw_config), base_dir=str(base_dir),
            manifest_id=manifest_id, latent_cache=latent_result.outputs["cache_prefix"],
            latent_keys=latent_result.outputs["keys"], text_cache=text_result.outputs["cache_prefix"],
            text_keys=text_result.outputs["keys"], validation_endpoint=endpoints.get("validation", ""),
            data_backend_config_json=backends_json,
        ))
        run.phases.append(trained)
        return run
    finally:
        for channel in channels.values():
            channel.close()

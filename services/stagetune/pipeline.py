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
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from stagetune.core import errors
from stagetune.core.client import TERMINAL, call, follow
from stagetune.core.errors import InputError
from stagetune.core.grpc_server import RunningServer, start_server
from stagetune.core.messages import to_struct
from stagetune.core.run_settings import config_settings, decide
from stagetune.core.security import ChannelSecurity, ServerSecurity
from stagetune.core.store.base import Store
from stagetune.preflight import RunPlan, prepare_run
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
#: Each service's default gRPC and metrics ports, distinct so all five can run on one host as the README
#: shows them (`stagetune serve <service>` with no port flags).
DEFAULT_PORTS: dict[str, tuple[int, int]] = {
    "ingest": (50051, 9471),
    "vae": (50052, 9472),
    "text": (50053, 9473),
    "trainer": (50054, 9474),
    "validation": (50055, 9475),
}

#: The stages `stagetune train` calls itself; validation is called by the trainer, from where the trainer runs.
CLIENT_STAGES = ("ingest", "vae", "text", "trainer")


def resolve_endpoints(endpoint: str | None, overrides: str | None = None) -> dict[str, str]:
    """The stages' addresses for `stagetune train --endpoint HOST[:PORT] [--endpoints stage=HOST:PORT,…]`.

    The chart gives each stage its own Service on its own port (50051–50054 for the four a client calls),
    and one host reaching them all (a LoadBalancer, an ingress, or `kubectl port-forward` of the four) keeps
    that order: ingest at PORT, vae PORT+1, text PORT+2, trainer PORT+3. `--endpoints` names stages that live
    elsewhere; `validation=HOST:PORT` is passed to the trainer as it must reach validation (by default the
    trainer uses its own STAGETUNE_VALIDATION_ENDPOINT, which the chart sets).
    """
    out: dict[str, str] = {}
    if endpoint:
        host, port = _host_port(endpoint, "endpoint", default_port=DEFAULT_PORTS["ingest"][0])
        out = {name: f"{host}:{port + i}" for i, name in enumerate(CLIENT_STAGES)}
    for item in (overrides or "").split(","):
        if not item.strip():
            continue
        name, sep, address = item.strip().partition("=")
        if not sep or name not in SERVICES:
            raise InputError(f"--endpoints takes stage=HOST:PORT pairs (stages {', '.join(SERVICES)}), got "
                             f"{item.strip()!r}", field="endpoints")
        host, port = _host_port(address, f"endpoints {name}", default_port=None)
        out[name] = f"{host}:{port}"
    missing = [name for name in CLIENT_STAGES if name not in out]
    if missing:
        raise InputError(f"no address for {', '.join(missing)}: give --endpoint HOST[:PORT] or name each in "
                         "--endpoints", field="endpoints")
    return out


def _host_port(text: str, what: str, default_port: int | None) -> tuple[str, int]:
    if "/" in text or not text.strip():
        raise InputError(f"--{what}: {text!r} is not HOST[:PORT] (a host name, not a URL)", field="endpoints")
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or host.endswith(":"):  # no port (or a bare IPv6 address): the default, if there is one
        host, port_text = text.strip(), ""
    if not port_text:
        if default_port is None:
            raise InputError(f"--{what}: {text!r} has no port: give HOST:PORT", field="endpoints")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InputError(f"--{what}: port {port_text!r} in {text!r} is not a port number", field="endpoints")
    return host, int(port_text)


def check_endpoints(endpoints: dict[str, str], security: ChannelSecurity, timeout_s: float = 10.0) -> None:
    """Each stage the client calls answers, and takes our token, before anything starts: a wrong address,
    a missing token or TLS mismatch is said for every stage at once, not after ingest has run."""
    stubs = {"ingest": ingest_pb2_grpc.IngestServiceStub, "vae": vae_pb2_grpc.VaeServiceStub,
             "text": text_pb2_grpc.TextServiceStub, "trainer": trainer_pb2_grpc.TrainerServiceStub}
    problems = errors.Collector()
    channels = {name: security.channel(endpoints[name]) for name in stubs}
    try:  # all at once: an address that drops packets costs one timeout, not four
        calls = {name: make(channels[name]).List.future(common_pb2.ListJobsRequest(page_size=1), timeout=timeout_s)
                 for name, make in stubs.items()}
        for name, pending in calls.items():
            try:
                pending.result()
            except grpc.RpcError as exc:
                problems.add(_endpoint_problem(name, endpoints[name], exc))
    finally:
        for channel in channels.values():
            channel.close()
    problems.raise_if_any()


def _endpoint_problem(name: str, address: str, exc: grpc.RpcError) -> errors.StagetuneError:
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return errors.UnauthenticatedError(
            f"{name} at {address} refused the call: {exc.details()} (give --token-file, or set "
            "STAGETUNE_API_TOKEN / STAGETUNE_API_TOKEN_FILE)", field="token_file")
    return errors.UnavailableError(
        f"{name} at {address} does not answer ({code.name}: {exc.details() or code.name}); check the address, "
        "the port and TLS (--tls-ca for a deployment that serves TLS)", field="endpoints")


def service_binding(name: str, store: Store) -> Any:
    if name not in SERVICES:
        raise InputError(f"unknown service {name!r}: choose one of {', '.join(SERVICES)}", field="service")
    module = __import__(f"stagetune.{name}.service", fromlist=["binding"])
    return module.binding(store)


def start_embedded(store: Store, host: str = "127.0.0.1", security: ServerSecurity | None = None
                   ) -> dict[str, RunningServer]:
    """One server per service, each on its own free loopback port (with the token/TLS settings given)."""
    return {name: start_server([service_binding(name, store)], host=host, security=security) for name in SERVICES}


@dataclasses.dataclass
class PhaseResult:
    name: str
    seconds: float
    outputs: dict[str, str]


@dataclasses.dataclass
class TrainingRun:
    phases: list[PhaseResult] = dataclasses.field(default_factory=list)
    #: The output_dir already held this run, finished at this step: nothing was trained.
    already_finished: int | None = None
    #: Training settings changed since the checkpoint this run resumed (SimpleTuner's resume-and-adjust).
    changed_settings: list[str] = dataclasses.field(default_factory=list)

    def phase(self, name: str) -> PhaseResult:
        return next(p for p in self.phases if p.name == name)


EventSink = Callable[[str, common_pb2.Event], None]

#: How long Ctrl-C waits for the running stages to stop at their next batch before giving up on them.
CANCEL_WAIT_S = 1.0
#: How long Ctrl-C waits for the trainer to save its checkpoint (what lets the next run resume).
TRAINER_SAVE_S = 600.0


class _Stages:
    """The services' stubs, and the jobs started on them, so Ctrl-C can cancel every running one."""

    def __init__(self, channels: dict[str, grpc.Channel], on_event: EventSink,
                 on_phase: Callable[[PhaseResult], None]) -> None:
        self.stubs = {
            "ingest": ingest_pb2_grpc.IngestServiceStub(channels["ingest"]),
            "vae": vae_pb2_grpc.VaeServiceStub(channels["vae"]),
            "text": text_pb2_grpc.TextServiceStub(channels["text"]),
            "trainer": trainer_pb2_grpc.TrainerServiceStub(channels["trainer"]),
        }
        self.on_event = on_event
        self.on_phase = on_phase
        self.running: dict[str, common_pb2.Job] = {}
        self._lock = threading.Lock()

    def run(self, name: str, request: Any) -> PhaseResult:
        stub = self.stubs[name]
        started = time.perf_counter()
        job = call(stub.Start, request)
        with self._lock:
            self.running[name] = job
        try:
            job = follow(stub, job, lambda event: self.on_event(name, event))
        except KeyboardInterrupt:
            raise  # still running: cancel_all cancels it
        except BaseException:
            self._forget(name)
            raise
        self._forget(name)
        result = PhaseResult(name, time.perf_counter() - started, dict(job.outputs))
        self.on_phase(result)
        return result

    def _forget(self, name: str) -> None:
        with self._lock:
            self.running.pop(name, None)

    def cancel(self, name: str) -> None:
        with self._lock:
            job = self.running.get(name)
        if job is not None:
            with contextlib.suppress(errors.StagetuneError):
                call(self.stubs[name].Cancel, common_pb2.CancelJobRequest(job_id=job.job_id))

    def cancel_all(self, wait_s: float = CANCEL_WAIT_S) -> None:
        """Cancel every running job and wait for them to stop: the encoders at their next batch (finished
        shards are kept) within `wait_s`, the trainer until its checkpoint is saved (up to TRAINER_SAVE_S)."""
        with self._lock:
            running = dict(self.running)
        for name, job in running.items():
            with contextlib.suppress(errors.StagetuneError):
                call(self.stubs[name].Cancel, common_pb2.CancelJobRequest(job_id=job.job_id))
        for name, job in running.items():
            deadline = time.monotonic() + (TRAINER_SAVE_S if name == "trainer" else wait_s)
            while time.monotonic() < deadline:
                try:
                    state = call(self.stubs[name].Get, common_pb2.GetJobRequest(job_id=job.job_id)).state
                except errors.StagetuneError:
                    break
                if state in TERMINAL:
                    break
                time.sleep(0.05)


def run_training(
    plan: RunPlan | Path | str,
    endpoints: dict[str, str],
    *,
    data_backend_config: str | None = None,
    on_event: EventSink = lambda phase, event: None,
    on_phase: Callable[[PhaseResult], None] = lambda result: None,
    channel_options: ChannelSecurity | None = None,
) -> TrainingRun:
    """Drive one training run through the services; raises the service's own error on failure.

    `plan` is a checked run (preflight.prepare_run, which holds the output_dir's lock), or a config path
    to check here. Ctrl-C cancels every running stage; each stops at its next batch or step.
    """
    owned = not isinstance(plan, RunPlan)
    if owned:
        plan = prepare_run(Path(plan), store=None, data_backend_config=data_backend_config)
    assert isinstance(plan, RunPlan)
    security = channel_options or ChannelSecurity()
    channels = {name: security.channel(address) for name, address in endpoints.items()}
    stages = _Stages(channels, on_event, on_phase)
    try:
        return _drive(plan, stages, endpoints)
    except KeyboardInterrupt:
        stages.cancel_all()
        raise
    finally:
        for channel in channels.values():
            channel.close()
        if owned:
            plan.close()


def _drive(plan: RunPlan, stages: _Stages, endpoints: dict[str, str]) -> TrainingRun:
    cfg = plan.cfg
    run_id = uuid.uuid4().hex[:12]
    run = TrainingRun()
    ingested = stages.run("ingest", ingest_pb2.StartIngestRequest(
        request_id=f"{run_id}-ingest", data_backend_config_json=plan.backends_json,
        dataset_defaults_json=json.dumps(cfg.dataset_defaults(), default=str), base_dir=str(plan.base_dir),
        train_batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        world_size=cfg.num_processes, seed=cfg.seed or 0,
        allow_dataset_oversubscription=cfg.allow_dataset_oversubscription,
    ))
    run.phases.append(ingested)
    finished = _check_data(plan, ingested.outputs)
    if finished is not None:
        run.already_finished = finished
        return run
    manifest_id = ingested.outputs["manifest_id"]
    model = common_pb2.ModelRef(name_or_path=cfg.pretrained_model_name_or_path, revision=cfg.revision or "",
                                family=cfg.model_family, quantisation=cfg.text_encoder_quantisation())
    prompts = [cfg.validation_prompt, cfg.validation_negative_prompt]
    extra = [] if cfg.validation_disable else [p for p in prompts if p]
    latent_result, text_result = _encode_both(stages, vae_pb2.StartEncodeLatentsRequest(
        request_id=f"{run_id}-vae", manifest_id=manifest_id, model=model,
        vae_batch_size=cfg.vae_batch_size, write_batch_size=cfg.write_batch_size,
        data_backend_config_json=plan.backends_json, base_dir=str(plan.base_dir),
        keys_only=cfg.vae_cache_ondemand or cfg.vae_cache_disable,
    ), text_pb2.StartEncodeTextRequest(
        request_id=f"{run_id}-text", manifest_id=manifest_id, extra_captions=extra, model=model,
        family_options=to_struct(cfg.family_options), batch_size=cfg.text_encoder_batch_size,
        write_batch_size=int(ingested.outputs.get("text_write_batch_size") or cfg.write_batch_size),
        keys_only=cfg.text_cache_ondemand or cfg.text_cache_disable,
    ))
    run.phases += [latent_result, text_result]
    trained = stages.run("trainer", trainer_pb2.StartTrainingRequest(
        request_id=f"{run_id}-trainer", config_json=json.dumps(plan.raw_config), base_dir=str(plan.base_dir),
        manifest_id=manifest_id, latent_cache=latent_result.outputs["cache_prefix"],
        latent_keys=latent_result.outputs["keys"], text_cache=text_result.outputs["cache_prefix"],
        text_keys=text_result.outputs["keys"], validation_endpoint=endpoints.get("validation", ""),
        data_backend_config_json=plan.backends_json, run_lock_owner=plan.lock.owner if plan.lock else "",
    ))
    run.phases.append(trained)
    if trained.outputs.get("already_finished"):
        run.already_finished = int(trained.outputs["already_finished"])
    run.changed_settings = [c for c in trained.outputs.get("changed_settings", "").split("; ") if c]
    return run


def _encode_both(stages: _Stages, vae_request: Any, text_request: Any) -> tuple[PhaseResult, PhaseResult]:
    """The two encoder stages at once. When one fails the other is cancelled, not left running, and the
    first failure is the one reported. The text stage is followed on a daemon thread, so Ctrl-C never
    waits on it (run_training cancels both)."""
    box: dict[str, Any] = {}

    def text_phase() -> None:
        try:
            box["result"] = stages.run("text", text_request)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            box["error"] = exc
            stages.cancel("vae")

    thread = threading.Thread(target=text_phase, name="text-phase", daemon=True)
    thread.start()
    try:
        latent_result = stages.run("vae", vae_request)
    except errors.StagetuneError:
        if "error" in box:
            raise box["error"] from None
        stages.cancel("text")
        raise
    thread.join()
    if "error" in box:
        raise box["error"]
    return latent_result, box["result"]


def _check_data(plan: RunPlan, ingest_outputs: dict[str, str]) -> int | None:
    """After ingest, before any encoding: refuse another run's data; say when the run already finished."""
    if plan.output_state is None:  # unreachable from here: the deployment's trainer decides (preflight.RunPlan)
        return None
    data = {"samples": int(ingest_outputs.get("data_samples") or 0), "digest": ingest_outputs.get("data_digest", "")}
    current = {**config_settings(plan.cfg), "data": data}
    decision = decide(plan.output_state, current, resume_from_checkpoint=plan.cfg.resume_from_checkpoint)
    finished = decision.finished_step
    if finished is not None and plan.cfg.uses_max_train_steps and plan.cfg.max_train_steps <= finished:
        if plan.cfg.push_to_hub and plan.output_state.pushed_step(plan.cfg.hub_repo_id()) != finished:
            return None  # trained but not published: the trainer pushes without training
        return finished
    return None

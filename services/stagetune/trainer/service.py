"""TrainerService: runs `Trainer` on cached latents and embeddings, and asks validation to sample
from adapter snapshots without waiting for it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stagetune.core import requests
from stagetune.core.errors import Collector, InputError
from stagetune.core.grpc_server import ServiceBinding, job_service
from stagetune.core.jobs import JobContext
from stagetune.core.outputs import open_output, output_location
from stagetune.core.run_lock import RunLock
from stagetune.core.store.base import Store
from stagetune.v1 import trainer_pb2, trainer_pb2_grpc

SERVICE = "trainer"


def train_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.config.train import config_from_json, load_train_config

    req: trainer_pb2.StartTrainingRequest = ctx.request
    base_dir = Path(req.base_dir) if req.base_dir else None
    cfg = load_train_config(config_from_json(req.config_json), base_dir=base_dir)
    output = open_output(cfg.output_dir, base_dir)
    if cfg.machine_rank > 0:  # another machine's share of a run whose machine 0 holds the lock and writes
        from stagetune.trainer.workers import run_workers

        return run_workers(ctx, cfg)
    with RunLock(output, owner=req.run_lock_owner or None).adopt_or_acquire():
        if cfg.num_processes > 1:
            from stagetune.trainer.kube.launcher import launcher_for

            cluster = launcher_for(cfg)
            if cluster is not None:  # more than this pod holds: a Kubernetes run (trainer/kube/launcher.py)
                from stagetune.trainer.kube.launcher import run_on_cluster

                return run_on_cluster(ctx, cfg, cluster)
            from stagetune.trainer.workers import run_workers  # worker processes this job supervises

            return run_workers(ctx, cfg)
        return train_in_process(ctx, cfg)


def train_in_process(ctx: Any, cfg: Any, world: Any = None) -> dict[str, str]:
    """Train in this process: the whole run, or (with `world`) one rank of it. `ctx` is the job's context,
    or a worker's stand-in that relays the same calls (trainer/worker.py)."""
    from stagetune.core.cache import ShardedCache
    from stagetune.core.manifest import load_manifest, load_report
    from stagetune.models.family import get_family
    from stagetune.models.loading import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # peft, accelerate and diffusers: one importing thread at a time (models/warmup.py)
        from stagetune.trainer.distributed import World
        from stagetune.trainer.loop import TrainData

    req: trainer_pb2.StartTrainingRequest = ctx.request
    world = world or World()
    if world.is_main:
        for warning in getattr(cfg, "warnings", []):
            ctx.log(warning, "warning")
    store = ctx.store
    rows = load_manifest(store, req.manifest_id)
    report = load_report(store, req.manifest_id)
    latent_keys = json.loads(store.get_bytes(req.latent_keys))
    text_keys = json.loads(store.get_bytes(req.text_keys))
    family = get_family(cfg.model_family)
    row_keys = [latent_keys[row.sample_id] for row in rows]
    latents, epoch_latent_key = latent_cache(ShardedCache(store, req.latent_cache), cfg, family, rows, row_keys,
                                             req.data_backend_config_json, per_epoch=per_epoch_datasets(report))
    data = TrainData(
        rows=rows,
        latents=latents,
        latent_keys=row_keys,
        epoch_latent_key=epoch_latent_key,
        texts=text_cache(ShardedCache(store, req.text_cache), cfg, family, text_keys),
        text_key=text_keys.__getitem__,
        report=report,
    )
    data.latents.refresh()
    data.texts.refresh()
    output = open_output(cfg.output_dir, Path(req.base_dir) if req.base_dir else None)
    return _train(ctx, cfg, data, output, family, req, world)


def _train(ctx: Any, cfg: Any, data: Any, output: Any, family: Any, req: trainer_pb2.StartTrainingRequest,
           world: Any) -> dict[str, str]:
    from stagetune.core.validation_requests import ValidationRequester, validation_prompts
    from stagetune.trainer.loop import Reporter, Trainer

    endpoint = validation_endpoint(req)
    validates = bool(endpoint and validation_prompts(cfg) and not cfg.validation_disable)
    if not world.is_main:  # the other ranks train in step and report nothing (rank 0 speaks for the run)
        trainer = Trainer(cfg, family, data, output, Reporter(cancelled=ctx.cancelled.is_set), world)
        trainer.validates = validates  # sharded weights are gathered for validation by every rank
        trainer.setup()
        return trainer.train()
    publisher = _publisher(ctx, cfg, output, family)
    validator = None
    if validates:
        base = Path(req.base_dir) if req.base_dir else None
        validator = ValidationRequester(endpoint, ctx.store, ctx.job_id, cfg,
                                        output_dir=output_location(cfg.output_dir, base))
    reporter = Reporter(
        progress=lambda step, total: ctx.progress("training", step, total, "steps"),
        log=ctx.log,
        metric=ctx.metric,
        validate=validator.request if validator else None,
        cancelled=ctx.cancelled.is_set,
    )
    if hasattr(ctx, "record_step"):  # a worker: its job records the step metrics (trainer/workers.py)
        reporter.record_step = ctx.record_step
    trainer = Trainer(cfg, family, data, output, reporter, world)
    trainer.validates = validates
    ctx.progress("loading model", 0, 1)
    trainer.setup()
    trackers = _start_trackers(cfg, output, trainer, reporter, validator)
    reporter.checkpointed = _after_checkpoint(ctx, cfg, trackers, publisher)
    try:
        outputs = trainer.train()
        if validator is not None and not outputs.get("already_finished"):
            ctx.progress("waiting for validation", 0, len(validator.pending))
            outputs["validation_images"] = str(validator.wait(ctx.cancelled.is_set))
    finally:
        if trackers is not None:
            if validator is not None:
                _log_validations(trackers, validator)
            trackers.finish()
        if validator is not None:
            validator.close()
    if publisher is not None and publisher.pushed_step() != int(outputs["steps"]):
        ctx.progress("pushing to the Hub", 0, 1)
        outputs["hub_commit"] = publisher.push_final(int(outputs["steps"]))
        ctx.log(f"pushed step {outputs['steps']} to {publisher.repo_id}: {outputs['hub_commit']}")
    outputs["output"] = output.url
    return outputs


#: Where this trainer reaches validation when a request names none: a remote client (`stagetune train
#: --endpoint`) cannot know the cluster's own address of it, so the chart sets this on the trainer.
ENV_VALIDATION_ENDPOINT = "STAGETUNE_VALIDATION_ENDPOINT"


def validation_endpoint(req: trainer_pb2.StartTrainingRequest) -> str:
    return req.validation_endpoint or os.environ.get(ENV_VALIDATION_ENDPOINT, "").strip()


def _publisher(ctx: JobContext, cfg: Any, output: Any, family: Any) -> Any:
    """push_to_hub's publisher, its repository created now: a refused token is said before training."""
    if not cfg.push_to_hub:
        return None
    from stagetune.trainer.hub import HubPublisher

    publisher = HubPublisher(cfg, output, family=family.name)
    ctx.progress("checking the Hub", 0, 1)
    publisher.prepare()
    return publisher


def _after_checkpoint(ctx: JobContext, cfg: Any, trackers: Any, publisher: Any) -> Callable[[int], None]:
    """Tracker files copied beside the checkpoint; the checkpoint uploaded (push_checkpoints_to_hub). A failed
    upload is a warning: the checkpoint is safe on disk and the final push sends the weights."""
    from stagetune.core.errors import StagetuneError

    def after(step: int) -> None:
        if trackers is not None:
            trackers.sync()
        if publisher is not None and cfg.push_checkpoints_to_hub:
            try:
                publisher.push_checkpoint(f"checkpoint-{step}")
            except StagetuneError as exc:
                ctx.log(str(exc), "warning")

    return after


def _start_trackers(cfg: Any, output: Any, trainer: Any, reporter: Any, validator: Any) -> Any:
    """report_to's trackers, fed each step's numbers and the validation images as they finish."""
    from stagetune.trainer.trackers import Trackers

    if trainer.already_finished is not None:
        return None
    bookkeeping = {"base_dir", "source_path", "explicit_keys", "warnings", "no_effect"}
    trackers = Trackers.start(cfg, output, resumed_step=trainer.resumed_from,
                              settings={k: v for k, v in cfg.model_dump().items() if k not in bookkeeping})
    if trackers is None:
        return None

    def track(values: dict[str, float], step: int) -> None:
        trackers.log(values, step)
        if validator is not None:
            _log_validations(trackers, validator)

    reporter.track = track
    return trackers


def _log_validations(trackers: Any, validator: Any) -> None:
    for step, images in validator.collect_images():
        trackers.log_images(images, step)


def per_epoch_datasets(report: dict) -> dict[str, str | None]:
    """Datasets with vae_cache_clear_each_epoch, and their crop style (from the ingest report)."""
    out = {}
    for dataset_id, entry in (report.get("datasets") or {}).items():
        sampling = entry.get("sampling") or {} if isinstance(entry, dict) else {}
        if sampling.get("vae_cache_clear_each_epoch"):
            out[str(dataset_id)] = entry.get("crop_style")
    return out


def latent_cache(cache: Any, cfg: Any, family: Any, rows: list, row_keys: list[str],
                 data_backend_config_json: str = "", *, per_epoch: dict[str, str | None] | None = None,
                 ) -> tuple[Any, Any]:
    """`(latents, epoch_latent_key)`: the precomputed cache, or one that encodes misses here.

    Misses are encoded here with vae_cache_ondemand / vae_cache_disable, and for the later epochs of
    datasets with vae_cache_clear_each_epoch (`per_epoch`), whose latents are new each epoch.
    """
    if not (cfg.vae_cache_ondemand or cfg.vae_cache_disable or per_epoch):
        return cache, None
    from stagetune.core.latents import DatasetImages, encode_rows
    from stagetune.core.ondemand import OnDemandCache
    from stagetune.trainer.epochs import epoch_row

    encoder = family.latent_encoder(cfg.pretrained_model_name_or_path, revision=cfg.revision)
    row_for_key = {key: row for key, row in zip(row_keys, rows, strict=True)}
    images = DatasetImages(data_backend_config_json)
    latents = OnDemandCache(cache, lambda key: encode_rows(encoder, [row_for_key[key]], images)[0], stage="vae",
                            write=not cfg.vae_cache_disable, write_batch_size=cfg.write_batch_size)
    if not per_epoch:
        return latents, None
    seed = int(cfg.seed or 0)

    def epoch_latent_key(index: int, epoch: int) -> str:
        row = rows[index]
        if epoch <= 0 or row.dataset_id not in per_epoch:
            return row_keys[index]
        seen = epoch_row(row, crop_style=per_epoch[row.dataset_id], seed=seed, epoch=epoch)
        key = encoder.latent_key(seen.entry_key)
        row_for_key[key] = seen
        return key

    return latents, epoch_latent_key


def text_cache(cache: Any, cfg: Any, family: Any, text_keys: dict[str, str]) -> Any:
    """The precomputed cache, or (text_cache_ondemand / text_cache_disable) one that encodes misses here."""
    if not (cfg.text_cache_ondemand or cfg.text_cache_disable):
        return cache
    from stagetune.core.embeddings import encode_captions
    from stagetune.core.ondemand import OnDemandCache, inverse

    encoder = family.text_encoder(cfg.pretrained_model_name_or_path, revision=cfg.revision,
                                  quantisation=cfg.text_encoder_quantisation())
    options = family.text_options(cfg.family_options)
    caption_for_key = inverse(text_keys)
    return OnDemandCache(cache, lambda key: encode_captions(encoder, [caption_for_key[key]], options)[0],
                         stage="text", write=not cfg.text_cache_disable, write_batch_size=cfg.write_batch_size)


def validator(store: Store) -> Callable[[trainer_pb2.StartTrainingRequest], None]:
    """Start's checks: the config, the manifest and caches it names, and an output_dir this run may use."""

    def validate(req: trainer_pb2.StartTrainingRequest) -> None:
        from stagetune.core.config.train import config_from_json, load_train_config

        problems = Collector()
        base = requests.base_dir(problems, req.base_dir)
        cfg = None
        with problems.check():
            cfg = load_train_config(config_from_json(req.config_json), base_dir=base)
        requests.manifest(problems, store, req.manifest_id)
        requests.store_objects(problems, store, [("latent_keys", req.latent_keys), ("text_keys", req.text_keys)])
        for name in ("latent_cache", "text_cache"):
            if not getattr(req, name):
                problems.add(InputError(f"{name} is empty: give the cache_prefix the encoder job returned",
                                        field=name))
        if req.validation_endpoint and ":" not in req.validation_endpoint:
            problems.add(InputError(f"validation_endpoint must be host:port, got {req.validation_endpoint!r}",
                                    field="validation_endpoint"))
        if req.data_backend_config_json:
            requests.json_list(problems, req.data_backend_config_json, "data_backend_config_json")
        if cfg is not None:
            with problems.check():
                _check_output(cfg, base, req.run_lock_owner)
        problems.raise_if_any("StartTrainingRequest")

    return validate


def _check_output(cfg: Any, base: Path | None, lock_owner: str) -> None:
    """Writable, not locked by another run, and not holding another model's or adapter's checkpoints."""
    from stagetune.core.checks import check_local_output
    from stagetune.core.errors import OutputInUseError
    from stagetune.core.run_settings import config_settings, decide, read_output_state

    if "://" not in str(cfg.output_dir):
        check_local_output(Path(cfg.output_dir))
    output = open_output(cfg.output_dir, base)
    if cfg.machine_rank > 0:  # machine 0 of the same run holds the lock and writes; this one only trains
        return
    lock = RunLock(output, owner=lock_owner or None)
    try:
        holder = lock.holder()
    finally:
        lock.release()
    if holder is not None:
        raise OutputInUseError(f"output_dir {output.url} is in use by another run ({holder})", field="output_dir")
    decide(read_output_state(output), config_settings(cfg), resume_from_checkpoint=cfg.resume_from_checkpoint)


def binding(store: Store) -> ServiceBinding:
    return job_service(store, name=SERVICE, servicer_base=trainer_pb2_grpc.TrainerServiceServicer,
                       add_to_server=trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                       request_type=trainer_pb2.StartTrainingRequest, work=train_job, validate=validator(store))

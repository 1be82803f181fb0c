"""The training loop: one optimizer step reads top to bottom in `Trainer.step`.

Everything random draws either from a sample's own seed (its caption, dropout, noise and σ:
trainer/batches.py) or from state the checkpoint saves (torch's global RNG for LoRA dropout, the
sampler's position), so a killed and resumed run ends with the same weights, bit for bit on CPU, as
one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from stagetune.core import checkpoints as checkpoint
from stagetune.core import metrics, run_settings
from stagetune.core.cache import ShardedCache
from stagetune.core.errors import ConfigError, PreconditionError, RunMismatchError
from stagetune.core.jobs import JobCancelled
from stagetune.core.ondemand import OnDemandCache
from stagetune.core.run_settings import Change, config_settings, data_settings, decide, read_output_state
from stagetune.core.store.base import Store
from stagetune.models.checkpointing import checkpoint_every
from stagetune.models.quantise import quantise
from stagetune.trainer.adapters import make_adapter
from stagetune.trainer.batches import BatchSource, Fetched, fetch
from stagetune.trainer.distributed import (
    World,
    load_whole_optimizer_state,
    shard_model,
    whole_optimizer_state,
)
from stagetune.trainer.ema import EMA_FILE, EMA_FOLDER, Ema
from stagetune.trainer.flow import FlowSchedule, masked_mse, noisy_input, sample_sigmas, timesteps_for
from stagetune.trainer.optimizers import OPTIMIZERS, build_optimizer
from stagetune.trainer.sampler import DatasetPlan, SamplerState, TrainingSampler, expand_repeats, plans_for
from stagetune.trainer.schedules import build_scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainData:
    """What the cache stages produced, resolved to keys per manifest row."""

    rows: Sequence[Any]
    latents: ShardedCache | Any  # or an OnDemandCache
    latent_keys: Sequence[str]  # per row
    texts: ShardedCache | Any
    text_key: Callable[[str], str]  # caption -> embedding cache key
    report: dict = dataclasses.field(default_factory=dict)  # the ingest report (per-dataset sampling keys)
    #: (row, epoch) -> latent key, for datasets with vae_cache_clear_each_epoch (see trainer/epochs.py).
    epoch_latent_key: Callable[[int, int], str] | None = None

    def latent_key(self, row: int, epoch: int) -> str:
        if self.epoch_latent_key is not None:
            return self.epoch_latent_key(row, epoch)
        return self.latent_keys[row]

    def flush(self) -> None:
        """Write out what on-demand caches encoded, so other jobs and a resumed run find it."""
        for cache in (self.latents, self.texts):
            if hasattr(cache, "flush"):
                cache.flush()


@dataclasses.dataclass
class Reporter:
    """How the loop talks to the outside (job events, validation) without knowing gRPC."""

    progress: Callable[[int, int], None] = lambda step, total: None
    log: Callable[[str], None] = lambda message: None
    metric: Callable[[str, float, int], None] = lambda name, value, step: None
    validate: Callable[[int, bytes, str], None] | None = None  # (step, LoRA bytes, variant ""/"ema"), no blocking
    cancelled: Callable[[], bool] = lambda: False
    track: Callable[[dict[str, float], int], None] = lambda values, step: None  # report_to's trackers, per step
    checkpointed: Callable[[int], None] = lambda step: None
    #: Prometheus' step metrics: recorded here, or relayed by a worker to the job that serves /metrics.
    record_step: Callable[..., None] = metrics.record_train_step


def check_bf16(device: torch.device, mixed_precision: str, warn: Callable[[str], None]) -> None:
    """SimpleTuner's default mixed_precision is bf16: refused on a GPU that has none, and said once on a CPU
    that only emulates it (it runs, slowly), naming the key either way."""
    if mixed_precision != "bf16":
        return
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PreconditionError(f"mixed_precision=bf16 (SimpleTuner's default): {torch.cuda.get_device_name(device)} "
                                "has no bfloat16; set mixed_precision to fp16 or no", field="mixed_precision")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        warn("mixed_precision=bf16 (SimpleTuner's default): this CPU has no native bfloat16, so it is emulated "
             "and slow; mixed_precision: no trains in float32")


class Trainer:
    def __init__(self, cfg: Any, family: Any, data: TrainData, output: Store, reporter: Reporter,
                 world: World | None = None) -> None:
        self.cfg = cfg
        #: This process's place among the run's workers: rank 0 alone writes checkpoints, outputs and reports.
        self.world = world or World()
        #: FSDP2 (fsdp_enable over several processes): the full-rank model sharded over the ranks.
        self.sharded = bool(getattr(cfg, "fsdp_enable", False)) and self.world.distributed
        #: Whether this run validates at all, known on every rank: gathering sharded weights for validation
        #: is a collective the other ranks must join (set by the service; rank 0 holds the validator).
        self.validates = False
        self.family = family
        self.data = data
        self.output = output
        self.report = reporter
        self.device = self.world.device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(cfg.mixed_precision))
        self.global_step = 0
        self.resumed_from = 0
        self.already_finished: int | None = None
        self.changes: tuple[Change, ...] = ()

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed or 0)
        check_bf16(self.device, cfg.mixed_precision, self.report.log)
        weight_dtype = self.autocast_dtype or torch.float32
        quantised = cfg.base_model_precision != "no_change"
        if quantised:  # as SimpleTuner: cast to base_model_default_dtype, then quantise (models/quantise.py)
            weight_dtype = torch.bfloat16 if cfg.base_model_default_dtype == "bf16" else torch.float32
            self.autocast_dtype = self.autocast_dtype or (torch.bfloat16 if weight_dtype == torch.bfloat16 else None)
        self.model = self.family.load_transformer(cfg.pretrained_model_name_or_path, revision=cfg.revision,
                                                  dtype=weight_dtype).to(self.device)
        if quantised:
            quantise(self.model, cfg.base_model_precision, exclude=self.family.quantisation_exclude)
        if cfg.gradient_checkpointing:
            checkpoint_every(self.model, cfg.gradient_checkpointing_interval or 1)
        if cfg.attention_mechanism != "diffusers" and "training" in cfg.sageattention_usage:
            self.model.set_attention_backend("sage")  # SageAttention through diffusers' dispatcher (CUDA)
        self.adapter = make_adapter(cfg, self.family, self.family.pipeline_class())
        self.params = self.adapter.attach(self.model)
        self.model.train()
        spec = OPTIMIZERS[cfg.optimizer]
        if spec.bf16_weights:  # adamw_bf16 keeps the trained weights in bfloat16, as SimpleTuner does
            for param in self.params:
                param.data = param.data.to(torch.bfloat16)
        if spec.bf16_weights and cfg.model_type == "full" and self.autocast_dtype is None:
            self.autocast_dtype = torch.bfloat16  # a bf16 transformer takes bf16 activations
        if self.sharded:
            shard_model(self.model, reshard_after_forward=cfg.fsdp_reshard_after_forward,
                        cpu_offload=cfg.fsdp_cpu_offload)
            self.adapter.sharded_over = self.world
            self.params = [p for p in self.model.parameters() if p.requires_grad]  # the sharded parameters
        self.optimizer = build_optimizer(cfg.optimizer, self.params, cfg, warn=self.report.log)
        self.schedule_free = spec.schedule_free
        if self.schedule_free:
            self.optimizer.train()
        self.ema = Ema(self.params, cfg, self.device) if cfg.use_ema else None
        samples = expand_repeats(self.data.rows)
        # one optimizer step takes a global batch of train_batch_size × processes; each rank trains its slice
        self.plans: dict[str, DatasetPlan] = {
            name: dataclasses.replace(plan, batch_size=plan.batch_size * self.world.size)
            for name, plan in plans_for(self.data.rows, self.data.report, cfg.train_batch_size).items()}
        self.sampler = TrainingSampler(samples, self.plans, cfg.seed or 0, cfg.gradient_accumulation_steps)
        if len(self.sampler) == 0:
            raise PreconditionError(
                f"no bucket holds a full batch of train_batch_size={cfg.train_batch_size}: "
                "add images, raise repeats or lower train_batch_size", field="train_batch_size")
        self.schedule = dataclasses.replace(FlowSchedule(
            shift=cfg.flow_schedule_shift, auto_shift=bool(cfg.flow_schedule_auto_shift),
            use_uniform=bool(cfg.flow_use_uniform_schedule), use_beta=bool(cfg.flow_use_beta_schedule),
            beta_alpha=cfg.flow_beta_schedule_alpha, beta_beta=cfg.flow_beta_schedule_beta,
            sigmoid_scale=cfg.flow_sigmoid_scale,
        ), **self.family.flow_schedule_overrides(cfg.pretrained_model_name_or_path, cfg.revision))
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.settings = {**config_settings(cfg), "data": data_settings(self.data.rows)}
        self._resume()

    def _total_steps(self) -> int:
        cfg = self.cfg
        if cfg.max_train_steps and cfg.max_train_steps > 0:
            return int(cfg.max_train_steps)
        per_epoch = math.ceil(len(self.sampler) / cfg.gradient_accumulation_steps)
        if not cfg.num_train_epochs or cfg.num_train_epochs <= 0:
            raise ConfigError("set max_train_steps or num_train_epochs", field="max_train_steps")
        return int(cfg.num_train_epochs) * per_epoch

    def _resume(self) -> None:
        """Resume this run's latest checkpoint, never another run's (core/run_settings.py decides)."""
        decision = decide(read_output_state(self.output), self.settings,
                          resume_from_checkpoint=self.cfg.resume_from_checkpoint)
        self.changes = decision.changes
        if decision.finished_step is not None and decision.finished_step >= self.total_steps:
            self.already_finished = decision.finished_step
            self.report.log(f"{self.output.url} already holds this run, finished at step {decision.finished_step}: "
                            f"nothing to train (raise max_train_steps or num_train_epochs to train on)")
            return
        found = checkpoint.resolve_resume(self.output, self.cfg.resume_from_checkpoint)
        if found is None:
            return
        store, step = found
        files, state = checkpoint.load_checkpoint(store, step)
        if not isinstance(state.get("settings"), dict):
            self.report.log(f"checkpoint-{step} was written before stagetune recorded run settings: resuming it "
                            "without comparing them")
        try:
            self.adapter.load_bytes(files[self.adapter.file])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunMismatchError(f"checkpoint-{step} in {store.url} does not fit this model and adapter: "
                                   f"{str(exc).splitlines()[0]}", field="resume_from_checkpoint") from None
        optimizer_state = torch.load(io.BytesIO(files["optimizer.pt"]), weights_only=True)
        if self.sharded:
            load_whole_optimizer_state(self.model, self.optimizer, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        if self.schedule_free:  # saved with its averaged (eval) weights: back to the training point
            self.optimizer.train()
        self.scheduler.load_state_dict(torch.load(io.BytesIO(files["scheduler.pt"]), weights_only=True))
        if self.ema is not None and EMA_FILE in files:
            self.ema.load_bytes(files[EMA_FILE])
        rng = torch.load(io.BytesIO(files["random_states.pt"]), weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.sampler.state = SamplerState(**state["sampler"])
        self.global_step = self.resumed_from = int(state["step"])
        changed = f" with changed settings: {'; '.join(str(c) for c in self.changes)}" if self.changes else ""
        self.report.log(f"resuming from checkpoint-{step} (step {self.global_step} of {self.total_steps}){changed}")

    # -- one step ----------------------------------------------------------------------------
    def _read_batch(self) -> Fetched:
        return fetch(self.sampler, self.data.rows, lambda row, epoch: self.data.latents.get(
            self.data.latent_key(row, epoch)), lambda caption: self.data.texts.get(self.data.text_key(caption)),
            int(self.cfg.seed or 0), self.cfg.caption_dropout_probability, share=self.world.slice)

    def _noise(self, fetched: Fetched, shape: torch.Size) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Each sample's noise (and noise offset) from its own generator, which then draws its σ."""
        generators = [torch.Generator().manual_seed(seed) for seed in fetched.seeds]
        noise = []
        for generator in generators:
            sample = torch.randn(shape[1:], generator=generator)
            if self.cfg.noise_offset and float(torch.rand(1, generator=generator)) < self.cfg.noise_offset_probability:
                offset = torch.randn((shape[1], 1, 1), generator=generator)
                sample = sample + self.cfg.noise_offset * offset
            noise.append(sample)
        return torch.stack(noise), generators

    def _micro_step(self) -> float:
        fetched = self.batches.next()
        self.consumed_state = fetched.state_after
        latents = self.family.training_latents(
            self._to_device(torch.stack([entry["latents"] for entry in fetched.latents])))
        text = {k: self._to_device(v) for k, v in
                self.family.collate_text(fetched.texts, self.cfg.family_options, fetched.empty).items()}
        noise, generators = self._noise(fetched, latents.shape)
        noise = noise.to(self.device, latents.dtype)
        sigmas = sample_sigmas(self.schedule, generators, self.family.latent_seq_len(latents)).to(self.device)
        noisy, target = noisy_input(latents, noise, sigmas)
        inputs = self.family.transformer_inputs(noisy, timesteps_for(sigmas), text)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if fetched.batch.plan.regularisation and self.adapter.has_base:  # else: ordinary data
                target = self._parent_prediction(inputs)
            pred = self.model(**inputs)[0]
        loss = masked_mse(pred.float(), target.float(), self._loss_mask(fetched))
        (loss / self.cfg.gradient_accumulation_steps).backward()
        return float(loss.detach())

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """On CUDA through pinned memory without blocking: the copy overlaps the step's first kernels."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _loss_mask(self, fetched: Fetched) -> torch.Tensor | None:
        """Masked loss: the batch's masks on the latent grid (cached beside the latents), ones where a sample
        has none; None when no sample has one."""
        if not any("loss_mask" in entry for entry in fetched.latents):
            return None
        masks = [entry.get("loss_mask") if "loss_mask" in entry else torch.ones_like(entry["latents"][:1])
                 for entry in fetched.latents]
        return self._to_device(torch.stack(masks))

    def _parent_prediction(self, inputs: dict) -> torch.Tensor:
        """Regularisation data (SimpleTuner's `is_regularisation_data`): the base model's own prediction,
        adapter off, is the target, so the adapter learns to leave such images alone."""
        with self.adapter.disabled(), torch.no_grad():
            return self.model(**inputs)[0].detach()

    def step(self) -> float:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the mean loss."""
        losses = [self._micro_step() for _ in range(self.cfg.gradient_accumulation_steps)]
        if not self.sharded:  # FSDP reduce-scatters the mean gradient itself
            self.world.average_gradients(self.params)  # every rank steps with the global batch's mean gradient
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            if self.cfg.grad_clip_method == "value":
                torch.nn.utils.clip_grad_value_(self.params, self.cfg.max_grad_norm)
            else:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.ema is not None:
            self.ema.step(self.global_step)
        return self.world.mean(sum(losses) / len(losses))

    # -- outputs -----------------------------------------------------------------------------
    def _optimizer_state(self) -> dict:
        if self.sharded:
            return whole_optimizer_state(self.model, self.optimizer)
        return self.optimizer.state_dict()

    def validation_bytes(self) -> bytes:
        """The adapter as validation loads it, at the weights that are kept (see _weights_to_keep)."""
        with self._weights_to_keep():
            return self.adapter.validation_bytes()

    @contextlib.contextmanager
    def _weights_to_keep(self) -> Iterator[None]:
        """Schedule-free optimizers (prodigy) train at one point and average at another: what is saved,
        validated and exported is the average (`eval()`), as SimpleTuner does; training goes on at `train()`."""
        if not self.schedule_free or not self.optimizer.param_groups[0].get("train_mode", True):
            yield
            return
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()

    def save_checkpoint(self) -> None:
        # every rank holds the same weights and state and rank 0 writes them; sharded, every rank first
        # takes part in gathering them
        if not self.world.is_main and not self.sharded:
            return

        def tensor_bytes(obj: Any) -> bytes:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            return buffer.getvalue()

        with self._weights_to_keep():  # weights and optimizer state from the same (eval) point
            files = {
                self.adapter.file: self.adapter.state_bytes(),
                "optimizer.pt": tensor_bytes(self._optimizer_state()),
                "scheduler.pt": tensor_bytes(self.scheduler.state_dict()),
                "random_states.pt": tensor_bytes({"torch": torch.get_rng_state()}),
            }
            files.update(self.adapter.checkpoint_extras())
            if self.ema is not None:
                files[EMA_FILE] = self.ema.state_bytes()
        if not self.world.is_main:
            return
        state = {"sampler": dataclasses.asdict(self.consumed_state), "settings": self.settings,
                 "total_steps": self.total_steps}
        self.data.flush()
        name = checkpoint.save_checkpoint(self.output, self.global_step, files, state,
                                          self.cfg.checkpoints_total_limit)
        self.report.log(f"saved {name}")
        self.report.checkpointed(self.global_step)

    def _validate(self) -> None:
        """Validate the trained weights, the averaged ones, or both (SimpleTuner's `ema_validation`). Sharded,
        every rank takes part in gathering each variant's weights; rank 0 sends them."""
        if not (self.validates if self.sharded else self.report.validate is not None):
            return  # no validator: validation off, or nothing to prompt
        which = self.cfg.ema_validation if self.ema is not None else "none"
        variants = {"none": ("",), "ema_only": ("ema",)}.get(which, ("", "ema"))
        for variant in variants:
            with self.ema.applied() if variant == "ema" and self.ema is not None else contextlib.nullcontext():
                data = self.validation_bytes()
            if self.report.validate is not None and self.world.is_main:
                self.report.validate(self.global_step, data, variant)

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> dict[str, str]:
        from stagetune.core.encode import compute_threads

        with compute_threads():  # never a count another job's thread left behind (see compute_threads)
            return self._train()

    def _train(self) -> dict[str, str]:
        if self.already_finished is not None:
            return {"lora": self.adapter.file, "steps": str(self.already_finished), "steps_trained": "0",
                    "already_finished": str(self.already_finished)}
        if self.global_step < self.total_steps and self.world.is_main:  # no longer finished, whatever was written
            run_settings.write_record(self.output, state="running", step=self.global_step,
                                      total_steps=self.total_steps, settings=self.settings, changes=self.changes)
        self.consumed_state = dataclasses.replace(self.sampler.state)
        # On-demand caches encode a miss (torch compute): read those batches in this thread (core/encode.py).
        on_demand = isinstance(self.data.latents, OnDemandCache) or isinstance(self.data.texts, OnDemandCache)
        self.batches = BatchSource(self._read_batch, threaded=not on_demand)
        try:
            self._train_steps()
        except JobCancelled:
            if self.global_step > self.resumed_from:
                self.save_checkpoint()  # Ctrl-C, SIGTERM or Cancel: the next run resumes here
            raise
        finally:
            self.batches.close()
        self.data.flush()
        if self.world.is_main or self.sharded:  # sharded, every rank takes part in gathering the weights
            self._write_outputs()
        outputs = {"lora": self.adapter.file, "steps": str(self.global_step),
                   "steps_trained": str(self.global_step - self.resumed_from)}
        if self.changes:
            outputs["changed_settings"] = "; ".join(str(c) for c in self.changes)
        return outputs

    def _write_outputs(self) -> None:
        with self._weights_to_keep():
            written = self.adapter.export(self.output)
            if self.ema is not None:
                with self.ema.applied():
                    written += self.adapter.export(self.output, folder=EMA_FOLDER)
        if self.world.is_main:
            run_settings.write_record(self.output, state="finished", step=self.global_step,
                                      total_steps=self.total_steps, settings=self.settings, changes=self.changes)
            self.report.log(f"wrote {', '.join(written)} after {self.global_step} steps")
        self._validate()

    def _report_step(self, family: str, loss: float, elapsed: float) -> None:
        """One step's numbers: job events, Prometheus, and the trackers (SimpleTuner's names)."""
        waited = self.batches.take_wait()
        lr = self.scheduler.get_last_lr()[0]
        gpu_peak = float(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        # samples of the global batch (every rank's), as the step counter counts the run's steps
        samples = self.cfg.train_batch_size * self.cfg.gradient_accumulation_steps * self.world.size
        self.report.record_step(family, elapsed, loss, waited, lr, samples, gpu_peak)
        self.report.metric("data_wait_seconds", waited, self.global_step)
        self.report.metric("loss", loss, self.global_step)
        self.report.metric("lr", lr, self.global_step)
        self.report.track({"train_loss": loss, "learning_rate": lr, "epoch": self.consumed_state.epoch + 1,
                           "step_seconds": elapsed, "data_wait_seconds": waited}, self.global_step)
        self.report.progress(self.global_step, self.total_steps)

    def _train_steps(self) -> None:
        cfg = self.cfg
        family = self.family.name
        self.report.progress(self.global_step, self.total_steps)
        while self.global_step < self.total_steps:
            if self.world.any(self.report.cancelled()):  # every rank stops at the same step
                raise JobCancelled("training cancelled")
            started = time.perf_counter()
            loss = self.step()
            self._report_step(family, loss, time.perf_counter() - started)
            if cfg.checkpointing_steps and self.global_step % cfg.checkpointing_steps == 0:
                self.save_checkpoint()
            if cfg.validation_steps and self.global_step % cfg.validation_steps == 0 \
                    and self.global_step < self.total_steps and (self.world.is_main or self.sharded):
                self._validate()

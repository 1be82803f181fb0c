"""Is this output_dir's run the run we are asked for? Settings by class, and what an output_dir holds.

A second `stagetune train` on an output_dir must never pass another run's weights off as its own. So
every checkpoint records the settings that made it, in classes:

- **model**: the base model and how it reads captions (path, revision, text lengths, precisions),
- **adapter**: the shape of what is trained (model_type, lora_type, rank, alpha),
- **data**: a digest of the manifest rows (every sample, its crop, captions and repeats),
- **training**: what the optimiser does (learning rate, schedule, steps, batch sizes, seed, loss options).

Resuming with another model, adapter or data is refused before any work, naming what differs and the
choices. Changing training settings and resuming is how SimpleTuner users extend or adjust a run, so it
is allowed, and every change is printed and recorded in the job's outputs. Options that do not touch
the weights (validation, checkpoint cadence, batch sizes of the cache stages, paths) are not compared.

`.stagetune/run.json` in the output store says a run finished (its final weights are written), so a
repeated command says so instead of claiming to have trained. Pure Python: the CLI checks all this
before it imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

from stagetune.core import checkpoints
from stagetune.core.errors import NotFoundError, RunMismatchError
from stagetune.core.store.base import Store
from stagetune.models.family import get_family

log = logging.getLogger(__name__)

RECORD_KEY = ".stagetune/run.json"
HUB_RECORD_KEY = ".stagetune/hub.json"  # what push_to_hub published: {"repo_id", "step", "commit"}
RECORD_FORMAT = 1
#: The final weights a finished run leaves in output_dir (SimpleTuner's names).
FINAL_WEIGHTS = ("pytorch_lora_weights.safetensors",)

REFUSED = ("model", "adapter", "data")
MODEL_KEYS = (
    "model_family", "pretrained_model_name_or_path", "revision", "variant", "base_model_precision",
    "text_encoder_1_precision", "text_encoder_2_precision", "text_encoder_3_precision", "base_model_default_dtype",
)
ADAPTER_KEYS = ("model_type", "lora_type", "lora_rank", "lora_alpha", "lycoris")
#: Config fields that do not change the weights (or that reach them only through the data digest).
NOT_COMPARED = frozenset({
    "output_dir", "data_backend_config", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit",
    "user_prompt_library", "user_prompts", "vae_batch_size", "text_encoder_batch_size", "write_batch_size",
    "gradient_checkpointing", "vae_cache_ondemand", "vae_cache_disable", "text_cache_ondemand", "text_cache_disable",
    "quantize_via", "allow_dataset_oversubscription", "gradient_checkpointing_interval", "ema_validation",
    "ema_device", "ema_cpu_only", "ema_foreach_disable", "lora_init_type", "init_lora", "lycoris_config",
    "report_to", "logging_dir", "tracker_project_name", "tracker_run_name", "push_to_hub", "push_checkpoints_to_hub",
    "hub_model_id", "model_card_private", "model_card_safe_for_work", "model_card_note",
    "text_encoder_4_precision",  # no family with a fourth encoder yet: a set value is dropped with a warning
    # the dataset defaults shape the manifest rows, which the data digest covers
    "resolution", "resolution_type", "crop", "crop_style", "crop_aspect", "minimum_image_size", "maximum_image_size",
    "target_downsample_size", "caption_strategy", "instance_prompt",
    # how many processes train: the weights are the same up to float rounding (trainer/distributed.py)
    "num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
    "fsdp_enable", "fsdp_version", "fsdp_reshard_after_forward", "fsdp_cpu_offload", "fsdp_state_dict_type",
    # bookkeeping
    "base_dir", "source_path", "explicit_keys", "warnings", "no_effect", "family_options",
})


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_settings(cfg: Any) -> dict[str, dict[str, Any]]:
    """The model, adapter and training classes of a TrainConfig (the data class comes from the manifest)."""
    fields = type(cfg).model_fields
    training = sorted(
        name for name in fields
        if name not in NOT_COMPARED and name not in MODEL_KEYS and name not in ADAPTER_KEYS
        and not name.startswith("validation_")
    )
    family = get_family(cfg.model_family)
    options = dict(cfg.family_options)
    reads = set(family.text_option_keys)  # how the model reads captions: part of the model
    return {
        "model": {**{k: _plain(getattr(cfg, k)) for k in MODEL_KEYS if k in fields},
                  **{k: _plain(v) for k, v in options.items() if k in reads}},
        "adapter": {k: _plain(getattr(cfg, k)) for k in ADAPTER_KEYS if k in fields},
        "training": {**{k: _plain(getattr(cfg, k)) for k in training},
                     **{k: _plain(v) for k, v in options.items()
                        if k not in reads and not k.startswith("validation_")}},
    }


def data_settings(rows: Iterable[Any]) -> dict[str, Any]:
    """The data class: a digest of what every sample is (not where it lives), so a moved dataset folder
    with the same images, crops and captions is the same data."""
    digest = xxhash.xxh3_128()
    count = 0
    for row in sorted(rows, key=lambda r: (r.dataset_id, r.sample_id)):
        entry = [row.dataset_id, row.content_hash, row.entry_key, sorted(row.captions), int(row.repeats or 0),
                 bool(row.is_regularisation_data)]
        digest.update(json.dumps(entry, separators=(",", ":")).encode())
        count += 1
    return {"samples": count, "digest": digest.hexdigest()}


@dataclasses.dataclass(frozen=True)
class Change:
    kind: str  # model, adapter, data or training
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        if self.kind == "data":
            return f"data: {self.old} → {self.new}"
        return f"{self.key}: {_show(self.old)} → {_show(self.new)}"


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str | bool) or value is None else str(value)


def compare(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Change]:
    """What differs between saved and current settings, in the classes both have."""
    changes: list[Change] = []
    for kind in ("model", "adapter", "training"):
        old, new = saved.get(kind), current.get(kind)
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            continue
        for key in sorted(set(old) & set(new)):
            if old[key] != new[key]:
                changes.append(Change(kind, key, old[key], new[key]))
    old_data, new_data = saved.get("data"), current.get("data")
    if isinstance(old_data, Mapping) and isinstance(new_data, Mapping) and old_data != new_data:
        changes.append(Change("data", "samples", _describe_data(old_data), _describe_data(new_data)))
    return changes


def _describe_data(data: Mapping[str, Any]) -> str:
    return f"{data.get('samples')} samples (digest {str(data.get('digest', ''))[:12]})"


@dataclasses.dataclass
class OutputState:
    """What an output_dir holds from earlier runs."""

    url: str
    checkpoints: list[int]
    latest_settings: dict[str, Any] | None
    record: dict[str, Any] | None
    final_weights: list[str]
    hub: dict[str, Any] | None = None

    def pushed_step(self, repo_id: str) -> int | None:
        """The step push_to_hub last published to `repo_id`, or None."""
        if not self.hub or self.hub.get("repo_id") != repo_id:
            return None
        return int(self.hub["step"])

    @property
    def latest(self) -> int | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def empty(self) -> bool:
        return not (self.checkpoints or self.record or self.final_weights)

    @property
    def finished_step(self) -> int | None:
        """The step a finished run ended at (its final weights are written), else None."""
        record = self.record or {}
        if record.get("state") == "finished" and self.final_weights:
            return int(record.get("step", 0))
        return None


def read_output_state(store: Store) -> OutputState:
    steps = checkpoints.list_checkpoints(store)
    latest_settings = None
    if steps:
        try:
            state = json.loads(store.get_bytes(f"{checkpoints.checkpoint_name(steps[-1])}/{checkpoints.STATE_FILE}"))
            latest_settings = state.get("settings") if isinstance(state.get("settings"), dict) else None
        except (NotFoundError, ValueError):
            latest_settings = None
    record = None
    try:
        loaded = json.loads(store.get_bytes(RECORD_KEY))
        record = loaded if isinstance(loaded, dict) and loaded.get("format") == RECORD_FORMAT else None
    except NotFoundError:
        pass
    except ValueError:
        log.warning("ignoring unreadable run record %s in %s", RECORD_KEY, store.url)
    weights = [name for name in FINAL_WEIGHTS if store.exists(name)]
    hub = None
    try:
        loaded = json.loads(store.get_bytes(HUB_RECORD_KEY))
        hub = loaded if isinstance(loaded, dict) and "step" in loaded else None
    except (NotFoundError, ValueError):
        pass
    return OutputState(store.url, steps, latest_settings, record, weights, hub)


def write_record(store: Store, *, state: str, step: int, total_steps: int, settings: Mapping[str, Any],
                 changes: Iterable[Change] = ()) -> None:
    record = {"format": RECORD_FORMAT, "state": state, "step": step, "total_steps": total_steps,
              "settings": _plain(settings), "changed_settings": [str(c) for c in changes]}
    store.put_bytes(RECORD_KEY, json.dumps(record, indent=2, sort_keys=True).encode())


@dataclasses.dataclass(frozen=True)
class Decision:
    """How a run starts on an output_dir: fresh, or resumed with the allowed changes listed."""

    resume_step: int | None
    changes: tuple[Change, ...] = ()
    finished_step: int | None = None


def decide(state: OutputState, current: Mapping[str, Any], *, resume_from_checkpoint: str | None,
           what: str = "output_dir") -> Decision:
    """Refuse another run's output_dir (RunMismatchError naming what differs and the choices), else say
    whether the run resumes and which training settings changed. `current` may lack the data class (the
    CLI checks before ingest); it is compared when given."""
    saved = state.latest_settings or ((state.record or {}).get("settings") if state.record else None)
    changes = compare(saved, current) if isinstance(saved, Mapping) else []
    refused = [c for c in changes if c.kind in REFUSED]
    where = f"{what} {state.url}"
    if refused:
        held = (f"checkpoints {', '.join(checkpoints.checkpoint_name(s) for s in state.checkpoints[-3:])}"
                if state.checkpoints else f"the final weights {', '.join(state.final_weights)}")
        kinds = sorted({c.kind for c in refused}, key=REFUSED.index)
        raise RunMismatchError(
            f"{where} holds {held} of a run with a different {' and '.join(kinds)}:\n"
            + "".join(f"    {c}\n" for c in refused)
            + f"  Choose another {what} for the new run, or put the settings back to continue that run"
            + (", or remove its checkpoints and weights to start over." if state.checkpoints or state.final_weights
               else "."),
            field=refused[0].key if refused[0].kind != "data" else "data_backend_config",
        )
    if resume_from_checkpoint is None and not state.empty:
        held = ", ".join(checkpoints.checkpoint_name(s) for s in state.checkpoints[-3:]) or ", ".join(
            state.final_weights or [".stagetune/run.json"])
        raise RunMismatchError(
            f"{where} already holds a run ({held}) and resume_from_checkpoint is not set: a new run would mix "
            f"its files with those. Set resume_from_checkpoint to \"latest\" to continue it, choose another "
            f"{what}, or remove them to start over.",
            field="resume_from_checkpoint",
        )
    allowed = tuple(c for c in changes if c.kind == "training")
    if state.latest is None and state.final_weights and state.finished_step is None:
        raise RunMismatchError(
            f"{where} holds {', '.join(state.final_weights)} but no checkpoint to continue from: a new run would "
            f"overwrite it. Choose another {what}, or move the file away.",
            field=what,
        )
    if state.latest is None and state.finished_step is not None and allowed:
        raise RunMismatchError(
            f"{where} holds a finished run ({state.finished_step} steps) and no checkpoint to continue from with "
            f"the changed settings ({'; '.join(str(c) for c in allowed)}). Choose another {what} for a new run.",
            field=what,
        )
    return Decision(resume_step=state.latest, changes=allowed, finished_step=state.finished_step)

"""Rules between config.json options, checked once every value is typed.

Each value can be fine on its own and the combination still wrong (no run length at all), adjusted by
SimpleTuner at startup (constant with warmup), or silently without effect (an encoder precision for an
encoder the family lacks). These are refused or noted here, before any work starts.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from stagetune.core.config.trackers import check_trackers, tracker_warning
from stagetune.core.config.train_defaults import WHERE, st_default
from stagetune.core.errors import Collector, ConfigError, NotSupportedError, PreconditionError
from stagetune.models.family import family_names, get_family
from stagetune.models.quantise import NEEDS_COMPILER, check_precision


def check_required(fields: dict[str, Any], problems: Collector, warnings: list[str]) -> None:
    """Keys SimpleTuner cannot do without (or whose default stagetune does not offer)."""
    if "model_family" not in fields and "model_family" not in problems.fields():
        problems.add(ConfigError(f"model_family is required in {WHERE} (stagetune supports "
                                 f"{', '.join(family_names())})",
                                 field="model_family"))
    if "pretrained_model_name_or_path" not in fields:
        problems.add(ConfigError(
            f"pretrained_model_name_or_path is required in {WHERE}", field="pretrained_model_name_or_path"
        ))


def cross_check(fields: dict[str, Any], explicit: frozenset[str], warnings: list[str]) -> None:
    """Rules between options that SimpleTuner applies at startup, or that would silently do nothing."""
    max_steps = fields.get("max_train_steps")
    epochs = fields.get("num_train_epochs", st_default("num_train_epochs"))
    if max_steps is not None and max_steps < 0:
        raise ConfigError(f"max_train_steps must be >= 0, got {max_steps}", field="max_train_steps")
    if max_steps:
        if "num_train_epochs" in explicit and epochs > 0:
            warnings.append(
                f"max_train_steps={max_steps} and num_train_epochs={epochs} are both set: max_train_steps "
                "decides the run's length (SimpleTuner 4.8 refuses this pair; set num_train_epochs to 0)"
            )
    elif epochs <= 0:
        raise ConfigError(
            "set max_train_steps or num_train_epochs to a value > 0 (both are 0 or unset)",
            field="max_train_steps",
        )

    warmup = fields.get("lr_warmup_steps", 0)
    scheduler = fields.get("lr_scheduler", st_default("lr_scheduler"))
    if scheduler == "constant" and warmup > 0:
        fields["lr_scheduler"] = "constant_with_warmup"
        warnings.append(
            f"lr_scheduler=constant with lr_warmup_steps={warmup}: using constant_with_warmup, as SimpleTuner does"
        )
    if warmup > 0 and max_steps and warmup >= max_steps:
        warnings.append(
            f"lr_warmup_steps={warmup} >= max_train_steps={max_steps}: the learning rate never reaches learning_rate"
        )

    attention = fields.get("attention_mechanism", "diffusers")
    if attention != "diffusers" and importlib.util.find_spec("sageattention") is None:
        raise PreconditionError(f"attention_mechanism={attention} needs the sageattention package (CUDA GPUs only): "
                                "pip install sageattention, or use diffusers", field="attention_mechanism")

    _check_precisions(fields, warnings)
    _check_processes(fields)
    report_to = fields.get("report_to", st_default("report_to"))
    if (line := tracker_warning(report_to)) is not None:
        warnings.append(line)
    check_trackers(report_to)

    if fields.get("flow_use_uniform_schedule") and fields.get("flow_use_beta_schedule"):
        warnings.append(
            "flow_use_uniform_schedule and flow_use_beta_schedule are both set: the uniform schedule is "
            "used, as in SimpleTuner"
        )
    if fields.get("flow_schedule_auto_shift") and "flow_schedule_shift" in explicit:
        warnings.append(
            "flow_schedule_auto_shift is set: the resolution-dependent shift replaces "
            f"flow_schedule_shift={fields['flow_schedule_shift']}"
        )

    if fields.get("caption_strategy") == "instanceprompt" and not fields.get("instance_prompt"):
        warnings.append(
            "caption_strategy=instanceprompt without instance_prompt: every dataset must set its own instance_prompt"
        )


def _check_precisions(fields: dict[str, Any], warnings: list[str]) -> None:
    """A precision this machine cannot build is refused now; one for an encoder the family lacks is a warning."""
    if fields.get("base_model_precision") in NEEDS_COMPILER:
        check_precision(fields["base_model_precision"], "base_model_precision", cuda=False)
    name = fields.get("model_family")
    count = len(get_family(name).text_encoder_components) if name in family_names() else 4
    for n in range(1, 5):
        key = f"text_encoder_{n}_precision"
        precision = fields.get(key, "no_change")
        if precision == "no_change":
            continue
        if n > count:
            warnings.append(f"{key}={precision} changes nothing: {name} has {count} text encoders")
            fields[key] = "no_change"
        elif precision in NEEDS_COMPILER:
            check_precision(precision, key, cuda=False)


def _check_processes(fields: dict[str, Any]) -> None:
    """accelerate's rules: num_processes counts all machines' processes, spread evenly; ranks exist."""
    processes = fields.get("num_processes", 1)
    machines = fields.get("num_machines", 1)
    rank = fields.get("machine_rank", 0)
    if processes % machines:
        raise ConfigError(f"num_processes={processes} does not spread evenly over num_machines={machines} "
                          "(num_processes counts every machine's processes)", field="num_processes")
    if rank >= machines:
        raise ConfigError(f"machine_rank={rank} must be below num_machines={machines}", field="machine_rank")
    if fields.get("fsdp_enable"):
        _check_fsdp(fields, processes)


def _check_fsdp(fields: dict[str, Any], processes: int) -> None:
    """FSDP2 shards a full-rank model; what it cannot do yet is refused by name, never ignored."""
    if fields.get("fsdp_version", 2) != 2:
        raise NotSupportedError(f"not supported yet: fsdp_version={fields['fsdp_version']} (stagetune uses FSDP2)",
                                field="fsdp_version")
    if fields.get("model_type", st_default("model_type")) != "full":
        raise NotSupportedError("not supported yet: fsdp_enable with model_type lora (adapters are small: every "
                                "process holds them whole)", field="fsdp_enable")
    if fields.get("base_model_precision", "no_change") != "no_change":
        raise NotSupportedError("not supported yet: a quantised base_model_precision with fsdp_enable",
                                field="base_model_precision")
    if processes < 2:
        raise ConfigError("fsdp_enable shards the model over processes: set num_processes to 2 or more",
                          field="fsdp_enable")

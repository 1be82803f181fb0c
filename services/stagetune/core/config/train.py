"""config.json: SimpleTuner's training options, read unchanged and checked before any work starts.

Users bring the config.json they train SimpleTuner with. Three kinds of key exist:

- supported keys become typed `TrainConfig` fields, with SimpleTuner's defaults (a few deliberate
  departures are noted on the fields);
- every other key SimpleTuner's parser knows (`simpletuner_keys.OPTIONS`) is accepted only at
  SimpleTuner's default value, where it changes nothing; any other value raises `NotSupportedError`,
  because silently ignoring it would train a different job than the user asked for;
- anything else is a typo: `ConfigError` with the closest known key.

Values are read the way SimpleTuner's `mapping_to_cli_args` + argparse read them: `--key` and `key`
are the same key, `null` (and an empty string) means "SimpleTuner's default", numbers may be strings,
booleans may be the strings SimpleTuner's `_parse_bool_flag` accepts, and `{env:VAR}` is replaced by
the environment variable (SimpleTuner substitutes an empty string for an unset variable; we refuse,
naming it, since an empty path or token is never what the user meant).

Reading is split by job: `train_source` (where options come from, key spellings, null and `{env:VAR}`),
`train_convert` (typed values), `train_files` (paths and the files read at load time) and
`train_cross_checks` (rules between options); this module holds the TrainConfig model and the loader that
runs them in order, so every problem is reported together and in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.keys import check_keys
from stagetune.core.config.no_effect import NO_EFFECT
from stagetune.core.config.train_convert import (
    ATTENTION_BACKENDS,
    SUPPORTED_VALUES,
    convert_no_effect,
    convert_supported,
    family_options,
    parse_validation_resolution,
)
from stagetune.core.config.train_cross_checks import check_required, cross_check
from stagetune.core.config.train_defaults import FIELD_FOR_KEY, KEY_FOR_FIELD, WHERE, st_default
from stagetune.core.config.train_files import LYCORIS_ALGOS, load_user_prompt_library, resolve_files
from stagetune.core.config.train_source import ALLOW_EMPTY, config_from_json, given_values, merge_overrides, read_source
from stagetune.core.config.values import is_default
from stagetune.core.errors import Collector, ConfigError
from stagetune.models.family import all_option_keys

#: The model and loader, and the names that moved out when reading was split by job: other modules and tests
#: import them all from here.
__all__ = [
    "ALLOW_EMPTY",
    "ATTENTION_BACKENDS",
    "DATASET_DEFAULT_KEYS",
    "FIELD_FOR_KEY",
    "KEY_FOR_FIELD",
    "LYCORIS_ALGOS",
    "SUPPORTED_KEYS",
    "SUPPORTED_VALUES",
    "WHERE",
    "TrainConfig",
    "config_from_json",
    "load_train_config",
    "load_user_prompt_library",
    "parse_validation_resolution",
]


class TrainConfig(BaseModel):
    """The supported part of config.json, typed and checked; what every stage reads instead of the raw file.

    Defaults are SimpleTuner 4.8.0's unless a field says otherwise. Relative paths are resolved against
    `base_dir`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model_type: Literal["lora", "full"] = st_default("model_type")  # SimpleTuner's default: full
    model_family: str = "sd3"  # one of models/family.FAMILIES, checked when the config is read
    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    # a local folder (resolved against base_dir), or a store URL such as s3://bucket/prefix?endpoint=… kept as given
    output_dir: Path | str = Path(st_default("output_dir"))
    data_backend_config: Path | None = None
    seed: int | None = None  # as SimpleTuner: 0 means "from the clock", -1 "random"; the trainer resolves it

    # dataset-level defaults that datasets inherit (see dataset_defaults())
    resolution: int | float = st_default("resolution")
    resolution_type: Literal["pixel", "area", "pixel_area"] = st_default("resolution_type")
    crop: bool = st_default("crop")
    crop_style: Literal["center", "centre", "corner", "random", "face"] = st_default("crop_style")
    crop_aspect: Literal["square", "preserve", "closest", "random"] = st_default("crop_aspect")
    minimum_image_size: int | float | None = None
    maximum_image_size: int | float | None = None
    target_downsample_size: int | float | None = None
    # SimpleTuner's global spelling "instance_prompt" is normalised to the dataset-level "instanceprompt"
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] = "filename"
    instance_prompt: str | None = None
    caption_dropout_probability: float = Field(st_default("caption_dropout_probability"), ge=0.0, le=1.0)

    # schedule and optimiser
    train_batch_size: int = Field(st_default("train_batch_size"), ge=1)
    gradient_accumulation_steps: int = Field(st_default("gradient_accumulation_steps"), ge=1)
    learning_rate: float = Field(st_default("learning_rate"), gt=0.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "sine"] = st_default("lr_scheduler")
    lr_warmup_steps: int = Field(st_default("lr_warmup_steps"), ge=0)
    lr_end: float = Field(st_default("lr_end"), ge=0.0)
    lr_power: float = Field(st_default("lr_power"), gt=0.0)
    lr_num_cycles: int = Field(st_default("lr_num_cycles"), ge=1)
    max_train_steps: int | None = None  # wins over num_train_epochs when > 0
    num_train_epochs: int = Field(st_default("num_train_epochs"), ge=0)
    max_grad_norm: float = Field(st_default("max_grad_norm"), ge=0.0)  # 0 disables clipping
    # SimpleTuner's default "value" clips each gradient element at max_grad_norm; "norm" clips the global norm
    grad_clip_method: Literal["norm", "value"] = st_default("grad_clip_method")
    # a name of core/config/optimizer_names.SUPPORTED (aliases resolved); SimpleTuner's default adamw_bf16
    optimizer: str = st_default("optimizer")
    optimizer_config: str | None = None  # "key=value,..." settings passed to the optimizer (SimpleTuner's rules)
    optimizer_beta1: float | None = Field(None, ge=0.0, lt=1.0)
    optimizer_beta2: float | None = Field(None, ge=0.0, lt=1.0)
    prodigy_steps: int | None = Field(None, ge=0)
    # SimpleTuner 4.8 only passes these to DeepSpeed; its optimizers use the same numbers as defaults.
    # We honour them when set, so a user who sets them gets what the option names promise.
    adam_beta1: float = Field(st_default("adam_beta1"), ge=0.0, lt=1.0)
    adam_beta2: float = Field(st_default("adam_beta2"), ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(st_default("adam_weight_decay"), ge=0.0)
    adam_epsilon: float = Field(st_default("adam_epsilon"), gt=0.0)

    # LoRA
    lora_rank: int = Field(st_default("lora_rank"), ge=1)
    lora_alpha: float | None = None  # None means alpha = rank, as SimpleTuner
    lora_dropout: float = Field(st_default("lora_dropout"), ge=0.0, lt=1.0)
    lora_type: Literal["standard", "lycoris"] = "standard"
    lora_init_type: Literal["default", "gaussian", "olora", "pissa"] = st_default("lora_init_type")
    init_lora: Path | None = None  # a LoRA file to start from
    lycoris_config: Path = Path(st_default("lycoris_config"))  # read only with lora_type lycoris
    lycoris: dict[str, Any] = Field(default_factory=dict)  # the lycoris_config file's settings, loaded

    # processes (SimpleTuner's accelerate keys; torchrun semantics: num_processes counts every machine's)
    num_processes: int = Field(st_default("num_processes"), ge=1)
    num_machines: int = Field(st_default("num_machines"), ge=1)
    machine_rank: int = Field(st_default("machine_rank"), ge=0)
    main_process_ip: str = st_default("main_process_ip")
    main_process_port: int = Field(st_default("main_process_port"), ge=1, le=65535)
    # FSDP2: full-rank weights, gradients and optimizer state sharded over the processes
    fsdp_enable: bool = st_default("fsdp_enable")
    fsdp_version: int = st_default("fsdp_version")
    fsdp_reshard_after_forward: bool = st_default("fsdp_reshard_after_forward")
    fsdp_cpu_offload: bool = st_default("fsdp_cpu_offload")
    # checkpoints and outputs are always whole files (loadable anywhere); either value is accepted
    fsdp_state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"] = st_default("fsdp_state_dict_type")

    # checkpoints
    checkpointing_steps: int = Field(st_default("checkpointing_steps"), ge=0)
    checkpoints_total_limit: int | None = st_default("checkpoints_total_limit")
    resume_from_checkpoint: str | None = st_default("resume_from_checkpoint")  # "latest", a path, or None

    # validation
    validation_steps: int = Field(st_default("validation_steps"), ge=0)
    validation_prompt: str | None = None
    validation_resolution: list[tuple[int, int]] = Field(default_factory=lambda: [(256, 256)])
    validation_guidance: float = st_default("validation_guidance")
    validation_num_inference_steps: int = Field(st_default("validation_num_inference_steps"), ge=1)
    validation_seed: int | None = None
    validation_negative_prompt: str = st_default("validation_negative_prompt")
    user_prompt_library: Path | None = None
    user_prompts: dict[str, str] = Field(default_factory=dict)  # the library's {nickname: prompt}, loaded

    # flow matching (SD3)
    flow_schedule_shift: float = Field(st_default("flow_schedule_shift"), ge=0.0)
    flow_schedule_auto_shift: bool = False
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = Field(st_default("flow_beta_schedule_alpha"), gt=0.0)
    flow_beta_schedule_beta: float = Field(st_default("flow_beta_schedule_beta"), gt=0.0)
    flow_sigmoid_scale: float = st_default("flow_sigmoid_scale")

    # precision, batching, memory
    mixed_precision: Literal["no", "bf16", "fp16"] = st_default("mixed_precision")
    vae_batch_size: int = Field(st_default("vae_batch_size"), ge=1)
    text_encoder_batch_size: int = Field(st_default("text_encoder_batch_size"), ge=1)
    write_batch_size: int = Field(st_default("write_batch_size"), ge=1)
    gradient_checkpointing: bool = st_default("gradient_checkpointing")
    # checkpoint every N-th transformer block only (SimpleTuner's speed/memory trade-off); None: every block
    gradient_checkpointing_interval: int | None = Field(None, ge=1)
    # caches: encode before training (default), during training and keep (ondemand), or never keep (disable)
    vae_cache_ondemand: bool = st_default("vae_cache_ondemand")
    vae_cache_disable: bool = st_default("vae_cache_disable")
    text_cache_ondemand: bool = st_default("text_cache_ondemand")
    text_cache_disable: bool = st_default("text_cache_disable")
    noise_offset: float = Field(st_default("noise_offset"), ge=0.0)
    noise_offset_probability: float = Field(st_default("noise_offset_probability"), ge=0.0, le=1.0)
    attention_mechanism: str = "diffusers"  # diffusers, or SageAttention (CUDA; needs the sageattention package)
    sageattention_usage: Literal["training", "inference", "training+inference"] = st_default("sageattention_usage")

    # exponential moving average of the trained weights (trainer/ema.py)
    use_ema: bool = st_default("use_ema")
    ema_decay: float = Field(st_default("ema_decay"), gt=0.0, lt=1.0)
    ema_update_interval: int = Field(st_default("ema_update_interval"), ge=1)
    ema_device: Literal["accelerator", "cpu"] = st_default("ema_device")
    ema_cpu_only: bool = st_default("ema_cpu_only")
    ema_validation: Literal["none", "ema_only", "comparison"] = st_default("ema_validation")
    ema_warmup_steps: int = Field(st_default("ema_warmup_steps"), ge=0)
    ema_foreach_disable: bool = st_default("ema_foreach_disable")
    base_model_precision: str = "no_change"  # one of models/quantise.SUPPORTED (optimum-quanto, nf4-bnb)
    # frozen text encoders quantised in the text stage (and wherever captions are encoded): models/quantise.py
    text_encoder_1_precision: str = "no_change"
    text_encoder_2_precision: str = "no_change"
    text_encoder_3_precision: str = "no_change"
    text_encoder_4_precision: str = "no_change"

    # trackers (trainer/trackers.py): tensorboard and wandb; SimpleTuner's others are accepted with a warning
    report_to: str = st_default("report_to")
    logging_dir: str = st_default("logging_dir")  # relative to output_dir, as in SimpleTuner
    tracker_project_name: str = st_default("tracker_project_name")
    tracker_run_name: str = st_default("tracker_run_name")

    # publishing to the Hugging Face Hub (trainer/hub.py)
    push_to_hub: bool = st_default("push_to_hub")
    push_checkpoints_to_hub: bool = st_default("push_checkpoints_to_hub")
    hub_model_id: str | None = st_default("hub_model_id")  # unset: tracker_project_name, as SimpleTuner
    model_card_private: bool = st_default("model_card_private")
    model_card_safe_for_work: bool = st_default("model_card_safe_for_work")
    model_card_note: str | None = st_default("model_card_note")

    validation_disable: bool = st_default("validation_disable")  # no validation images at all
    # ingest raises a too-small dataset's repeats (unless it sets repeats itself) instead of dropping buckets
    allow_dataset_oversubscription: bool = st_default("allow_dataset_oversubscription")

    # stream previews of validation sampling every validation_preview_steps steps (validation service)
    validation_preview: bool = st_default("validation_preview")
    validation_preview_steps: int = Field(st_default("validation_preview_steps"), ge=1)
    base_model_default_dtype: Literal["bf16", "fp32"] = st_default("base_model_default_dtype")  # only when quantising
    quantize_via: Literal["cpu", "accelerator", "pipeline"] = st_default("quantize_via")

    # bookkeeping
    base_dir: Path = Field(default_factory=Path.cwd)
    source_path: Path | None = None
    explicit_keys: frozenset[str] = frozenset()  # TrainConfig fields the user set (in file or overrides)
    warnings: list[str] = Field(default_factory=list)
    #: Options accepted for a user's unchanged config that change nothing here (config/no_effect.py), as given.
    no_effect: dict[str, Any] = Field(default_factory=dict)
    #: The model family's own options (models/<family>/options.py), typed and checked by the family.
    family_options: dict[str, Any] = Field(default_factory=dict)

    def hub_repo_id(self) -> str:
        """push_to_hub's repository: hub_model_id, or tracker_project_name when unset (SimpleTuner's rule)."""
        return self.hub_model_id or self.tracker_project_name

    def text_encoder_quantisation(self) -> dict[str, str]:
        """`text_encoder_N` → precision for the quantised ones: the ModelRef's `quantisation` map."""
        return {f"text_encoder_{n}": value for n in range(1, 5)
                if (value := getattr(self, f"text_encoder_{n}_precision")) != "no_change"}

    def dataset_defaults(self) -> dict[str, Any]:
        """config.json's dataset-level values, for datasets in multidatabackend.json that do not set them."""
        return {key: getattr(self, key) for key in DATASET_DEFAULT_KEYS}

    @property
    def uses_max_train_steps(self) -> bool:
        """SimpleTuner: max_train_steps > 0 decides the run's length, else num_train_epochs does."""
        return self.max_train_steps is not None and self.max_train_steps > 0


DATASET_DEFAULT_KEYS = (
    "resolution",
    "resolution_type",
    "crop",
    "crop_style",
    "crop_aspect",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "caption_strategy",
    "instance_prompt",
)

#: config.json keys (canonical spelling) that are TrainConfig fields.
SUPPORTED_KEYS = frozenset(
    KEY_FOR_FIELD.get(name, name)
    for name in TrainConfig.model_fields
    if name not in {"user_prompts", "base_dir", "source_path", "explicit_keys", "warnings", "no_effect",
                    "family_options", "lycoris"}
)


# ------------------------------------------------------------------------------------------------ loader


def load_train_config(
    source: Path | str | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> TrainConfig:
    """Read config.json (a path or an already-parsed mapping) into a checked TrainConfig.

    `overrides` (e.g. command-line flags) win over the file, in any key spelling. `base_dir` is where
    relative paths resolve (default: the current directory, as SimpleTuner). No model or dataset is
    touched, except that `user_prompt_library` is read so a missing file fails now rather than at the first
    validation.
    """
    data, source_path = read_source(source)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems = Collector()  # every refused key and bad value, reported together
    warnings: list[str] = []
    merged = merge_overrides(data, overrides, warnings)
    known = SUPPORTED_KEYS | set(st.OPTIONS) | set(st.LEGACY_OPTIONS) | st.IGNORED_KEYS
    values = given_values(merged, known, problems, warnings)

    no_effect = {key: values.pop(key) for key in list(values) if key in NO_EFFECT and key not in SUPPORTED_KEYS}
    accepted = convert_no_effect(no_effect, warnings, problems)
    family_keys = all_option_keys()
    family_values = {key: values.pop(key) for key in list(values) if key in family_keys}
    given = _supported_values(values, family_keys, problems)

    fields = convert_supported(given, problems, warnings)
    explicit = frozenset(fields)
    check_required(fields, problems, warnings)
    resolve_files(fields, base, source_path, problems)
    with problems.check():
        cross_check(fields, explicit, warnings)
    fields["family_options"] = family_options(fields, family_values, problems, warnings)
    return _build(fields, problems, base_dir=base, source_path=source_path, explicit_keys=explicit,
                  warnings=warnings, no_effect=accepted)


def _supported_values(values: dict[str, Any], family_keys: Set[str], problems: Collector) -> dict[str, Any]:
    """The supported keys' values. Another key SimpleTuner knows passes only at its default (where it changes
    nothing); away from it, it is not supported yet. Anything else is a typo."""
    unsupported = (set(st.OPTIONS) | set(st.LEGACY_OPTIONS)) - SUPPORTED_KEYS - NO_EFFECT.keys() - family_keys
    inert = {key: (values[key],) for key in unsupported & values.keys() if is_default(key, values[key])}
    return check_keys(
        values,
        supported=SUPPORTED_KEYS | family_keys,  # (family keys were taken out above; here for suggestions)
        recognised_unsupported=unsupported,
        where=WHERE,
        inert_values=inert,
        problems=problems,
    )


def _build(fields: dict[str, Any], problems: Collector, *, base_dir: Path, source_path: Path | None,
           explicit_keys: frozenset[str], warnings: list[str], no_effect: dict[str, Any]) -> TrainConfig:
    """The TrainConfig, or every problem at once: pydantic's own only for fields not already reported, so
    one bad value is not reported twice."""
    config = None
    try:
        config = TrainConfig(
            **fields, base_dir=base_dir, source_path=source_path, explicit_keys=explicit_keys, warnings=warnings,
            no_effect=no_effect,
        )
    except ValidationError as exc:
        reported = problems.fields()
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else None
            if field not in reported:
                problems.add(ConfigError(f"{field}: {error['msg']} (got {error.get('input')!r})", field=field))
    problems.raise_if_any(WHERE)
    assert config is not None
    return config

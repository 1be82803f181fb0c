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
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stagetune.core.config import simpletuner_keys as st
from stagetune.core.config.files import read_json_file
from stagetune.core.config.keys import check_keys, normalise_key, suggest, unknown_key_error
from stagetune.core.config.no_effect import NO_EFFECT
from stagetune.core.config.optimizer_names import ALIASES as OPTIMIZER_ALIASES
from stagetune.core.config.optimizer_names import SUPPORTED as SUPPORTED_OPTIMIZERS
from stagetune.core.config.optimizer_names import canonical_name, parse_optimizer_config
from stagetune.core.config.trackers import check_trackers, tracker_warning
from stagetune.core.config.values import BOOL_FALSE, check_choice, coerce, is_default, show
from stagetune.core.errors import Collector, ConfigError, NotSupportedError, PreconditionError
from stagetune.models.family import all_option_keys, family_names, get_family
from stagetune.models.quantise import NEEDS_COMPILER, check_precision
from stagetune.models.quantise import SUPPORTED as QUANTISATIONS

WHERE = "config.json"

#: Optimizer spellings that mean torch.optim.AdamW. SimpleTuner itself only knows "torch-adamw".

#: LyCORIS algorithms whose weights train, save, resume and export (diffusers loads each through peft).
LYCORIS_ALGOS = ("lokr", "loha", "locon", "lora")

#: attention_mechanism values stagetune runs: diffusers' own, and SageAttention through diffusers' "sage" backend.
ATTENTION_BACKENDS = ("diffusers", "sageattention", "sageattention-int8-fp16-triton", "sageattention-int8-fp16-cuda",
                      "sageattention-int8-fp8-cuda")

#: config.json keys (canonical SimpleTuner spelling) that map to a differently named TrainConfig field.
FIELD_FOR_KEY = {
    "checkpoint_step_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
}
KEY_FOR_FIELD = {v: k for k, v in FIELD_FOR_KEY.items()}

#: Keys whose empty string SimpleTuner passes through (its `allow_empty` fields) instead of meaning "default":
#: an empty negative prompt means "no negative prompt", not "blurry, cropped, ugly".
ALLOW_EMPTY = frozenset({"validation_prompt", "validation_negative_prompt"})

#: Supported keys whose value must be one of a few; other values SimpleTuner accepts are "not supported yet".
SUPPORTED_VALUES: dict[str, frozenset[Any]] = {
    "model_type": frozenset({"lora", "full"}),
    "model_family": frozenset(family_names()),
    "lora_type": frozenset({"standard", "lycoris"}),
    "lora_init_type": frozenset({"default", "gaussian", "olora", "pissa"}),
    "mixed_precision": frozenset({"no", "bf16", "fp16"}),
    "attention_mechanism": frozenset(ATTENTION_BACKENDS),
    "base_model_precision": frozenset(QUANTISATIONS),
    **{f"text_encoder_{n}_precision": frozenset(QUANTISATIONS) for n in range(1, 5)},
}


def _opt(key: str) -> st.Option:
    return st.OPTIONS.get(key) or st.LEGACY_GLOBAL_OPTIONS[key]


def _default(key: str) -> Any:
    """SimpleTuner's default, so TrainConfig's defaults cannot drift from the catalogue."""
    return _opt(KEY_FOR_FIELD.get(key, key)).default


class TrainConfig(BaseModel):
    """The supported part of config.json, typed and checked; what every stage reads instead of the raw file.

    Defaults are SimpleTuner 4.8.0's unless a field says otherwise. Relative paths are resolved against
    `base_dir`.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model_type: Literal["lora", "full"] = _default("model_type")  # SimpleTuner's default: full
    model_family: str = "sd3"  # one of models/family.FAMILIES, checked when the config is read
    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    # a local folder (resolved against base_dir), or a store URL such as s3://bucket/prefix?endpoint=… kept as given
    output_dir: Path | str = Path(_default("output_dir"))
    data_backend_config: Path | None = None
    seed: int | None = None  # as SimpleTuner: 0 means "from the clock", -1 "random"; the trainer resolves it

    # dataset-level defaults that datasets inherit (see dataset_defaults())
    resolution: int | float = _default("resolution")
    resolution_type: Literal["pixel", "area", "pixel_area"] = _default("resolution_type")
    crop: bool = _default("crop")
    crop_style: Literal["center", "centre", "corner", "random", "face"] = _default("crop_style")
    crop_aspect: Literal["square", "preserve", "closest", "random"] = _default("crop_aspect")
    minimum_image_size: int | float | None = None
    maximum_image_size: int | float | None = None
    target_downsample_size: int | float | None = None
    # SimpleTuner's global spelling "instance_prompt" is normalised to the dataset-level "instanceprompt"
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] = "filename"
    instance_prompt: str | None = None
    caption_dropout_probability: float = Field(_default("caption_dropout_probability"), ge=0.0, le=1.0)

    # schedule and optimiser
    train_batch_size: int = Field(_default("train_batch_size"), ge=1)
    gradient_accumulation_steps: int = Field(_default("gradient_accumulation_steps"), ge=1)
    learning_rate: float = Field(_default("learning_rate"), gt=0.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                          "polynomial", "sine"] = _default("lr_scheduler")
    lr_warmup_steps: int = Field(_default("lr_warmup_steps"), ge=0)
    lr_end: float = Field(_default("lr_end"), ge=0.0)
    lr_power: float = Field(_default("lr_power"), gt=0.0)
    lr_num_cycles: int = Field(_default("lr_num_cycles"), ge=1)
    max_train_steps: int | None = None  # wins over num_train_epochs when > 0
    num_train_epochs: int = Field(_default("num_train_epochs"), ge=0)
    max_grad_norm: float = Field(_default("max_grad_norm"), ge=0.0)  # 0 disables clipping
    # SimpleTuner's default "value" clips each gradient element at max_grad_norm; "norm" clips the global norm
    grad_clip_method: Literal["norm", "value"] = _default("grad_clip_method")
    # a name of core/config/optimizer_names.SUPPORTED (aliases resolved); SimpleTuner's default adamw_bf16
    optimizer: str = _default("optimizer")
    optimizer_config: str | None = None  # "key=value,..." settings passed to the optimizer (SimpleTuner's rules)
    optimizer_beta1: float | None = Field(None, ge=0.0, lt=1.0)
    optimizer_beta2: float | None = Field(None, ge=0.0, lt=1.0)
    prodigy_steps: int | None = Field(None, ge=0)
    # SimpleTuner 4.8 only passes these to DeepSpeed; its optimizers use the same numbers as defaults.
    # We honour them when set, so a user who sets them gets what the option names promise.
    adam_beta1: float = Field(_default("adam_beta1"), ge=0.0, lt=1.0)
    adam_beta2: float = Field(_default("adam_beta2"), ge=0.0, lt=1.0)
    adam_weight_decay: float = Field(_default("adam_weight_decay"), ge=0.0)
    adam_epsilon: float = Field(_default("adam_epsilon"), gt=0.0)

    # LoRA
    lora_rank: int = Field(_default("lora_rank"), ge=1)
    lora_alpha: float | None = None  # None means alpha = rank, as SimpleTuner
    lora_dropout: float = Field(_default("lora_dropout"), ge=0.0, lt=1.0)
    lora_type: Literal["standard", "lycoris"] = "standard"
    lora_init_type: Literal["default", "gaussian", "olora", "pissa"] = _default("lora_init_type")
    init_lora: Path | None = None  # a LoRA file to start from
    lycoris_config: Path = Path(_default("lycoris_config"))  # read only with lora_type lycoris
    lycoris: dict[str, Any] = Field(default_factory=dict)  # the lycoris_config file's settings, loaded

    # checkpoints
    checkpointing_steps: int = Field(_default("checkpointing_steps"), ge=0)
    checkpoints_total_limit: int | None = _default("checkpoints_total_limit")
    resume_from_checkpoint: str | None = _default("resume_from_checkpoint")  # "latest", a path, or None

    # validation
    validation_steps: int = Field(_default("validation_steps"), ge=0)
    validation_prompt: str | None = None
    validation_resolution: list[tuple[int, int]] = Field(default_factory=lambda: [(256, 256)])
    validation_guidance: float = _default("validation_guidance")
    validation_num_inference_steps: int = Field(_default("validation_num_inference_steps"), ge=1)
    validation_seed: int | None = None
    validation_negative_prompt: str = _default("validation_negative_prompt")
    user_prompt_library: Path | None = None
    user_prompts: dict[str, str] = Field(default_factory=dict)  # the library's {nickname: prompt}, loaded

    # flow matching (SD3)
    flow_schedule_shift: float = Field(_default("flow_schedule_shift"), ge=0.0)
    flow_schedule_auto_shift: bool = False
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = Field(_default("flow_beta_schedule_alpha"), gt=0.0)
    flow_beta_schedule_beta: float = Field(_default("flow_beta_schedule_beta"), gt=0.0)
    flow_sigmoid_scale: float = _default("flow_sigmoid_scale")

    # precision, batching, memory
    mixed_precision: Literal["no", "bf16", "fp16"] = _default("mixed_precision")
    vae_batch_size: int = Field(_default("vae_batch_size"), ge=1)
    text_encoder_batch_size: int = Field(_default("text_encoder_batch_size"), ge=1)
    write_batch_size: int = Field(_default("write_batch_size"), ge=1)
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    # checkpoint every N-th transformer block only (SimpleTuner's speed/memory trade-off); None: every block
    gradient_checkpointing_interval: int | None = Field(None, ge=1)
    # caches: encode before training (default), during training and keep (ondemand), or never keep (disable)
    vae_cache_ondemand: bool = _default("vae_cache_ondemand")
    vae_cache_disable: bool = _default("vae_cache_disable")
    text_cache_ondemand: bool = _default("text_cache_ondemand")
    text_cache_disable: bool = _default("text_cache_disable")
    noise_offset: float = Field(_default("noise_offset"), ge=0.0)
    noise_offset_probability: float = Field(_default("noise_offset_probability"), ge=0.0, le=1.0)
    attention_mechanism: str = "diffusers"  # diffusers, or SageAttention (CUDA; needs the sageattention package)
    sageattention_usage: Literal["training", "inference", "training+inference"] = _default("sageattention_usage")

    # exponential moving average of the trained weights (trainer/ema.py)
    use_ema: bool = _default("use_ema")
    ema_decay: float = Field(_default("ema_decay"), gt=0.0, lt=1.0)
    ema_update_interval: int = Field(_default("ema_update_interval"), ge=1)
    ema_device: Literal["accelerator", "cpu"] = _default("ema_device")
    ema_cpu_only: bool = _default("ema_cpu_only")
    ema_validation: Literal["none", "ema_only", "comparison"] = _default("ema_validation")
    ema_warmup_steps: int = Field(_default("ema_warmup_steps"), ge=0)
    ema_foreach_disable: bool = _default("ema_foreach_disable")
    base_model_precision: str = "no_change"  # one of models/quantise.SUPPORTED (optimum-quanto, nf4-bnb)
    # frozen text encoders quantised in the text stage (and wherever captions are encoded): models/quantise.py
    text_encoder_1_precision: str = "no_change"
    text_encoder_2_precision: str = "no_change"
    text_encoder_3_precision: str = "no_change"
    text_encoder_4_precision: str = "no_change"

    # trackers (trainer/trackers.py): tensorboard and wandb; SimpleTuner's others are accepted with a warning
    report_to: str = _default("report_to")
    logging_dir: str = _default("logging_dir")  # relative to output_dir, as in SimpleTuner
    tracker_project_name: str = _default("tracker_project_name")
    tracker_run_name: str = _default("tracker_run_name")

    # publishing to the Hugging Face Hub (trainer/hub.py)
    push_to_hub: bool = _default("push_to_hub")
    push_checkpoints_to_hub: bool = _default("push_checkpoints_to_hub")
    hub_model_id: str | None = _default("hub_model_id")  # unset: tracker_project_name, as SimpleTuner
    model_card_private: bool = _default("model_card_private")
    model_card_safe_for_work: bool = _default("model_card_safe_for_work")
    model_card_note: str | None = _default("model_card_note")

    validation_disable: bool = _default("validation_disable")  # no validation images at all
    # ingest raises a too-small dataset's repeats (unless it sets repeats itself) instead of dropping buckets
    allow_dataset_oversubscription: bool = _default("allow_dataset_oversubscription")

    # stream previews of validation sampling every validation_preview_steps steps (validation service)
    validation_preview: bool = _default("validation_preview")
    validation_preview_steps: int = Field(_default("validation_preview_steps"), ge=1)
    base_model_default_dtype: Literal["bf16", "fp32"] = _default("base_model_default_dtype")  # only when quantising
    quantize_via: Literal["cpu", "accelerator", "pipeline"] = _default("quantize_via")

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

_ENV_PATTERN = re.compile(r"\{env:([^{}]*)\}")


# --------------------------------------------------------------------------------------------------- helpers


def _expand_env(value: Any, key: str) -> Any:
    """`{env:VAR}` anywhere in a string (also inside lists and objects), as SimpleTuner's template_vars."""
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{key}: environment variable {name!r} is not set (used as {{env:{name}}} in {WHERE})",
                    field=key,
                )
            return os.environ[name]

        return _ENV_PATTERN.sub(replace, value)
    if isinstance(value, list):
        return [_expand_env(v, key) for v in value]
    if isinstance(value, dict):
        return {k: _expand_env(v, key) for k, v in value.items()}
    return value


def parse_validation_resolution(value: Any, key: str = "validation_resolution") -> list[tuple[int, int]]:
    """ "1024x1024,1280x768" or 1024 → [(width, height), ...], as SimpleTuner's parse_validation_resolutions.

    SimpleTuner reads a bare number under 128 as megapixels; only "1" (→ 1024) converts sensibly there, so any
    other such value is refused rather than turned into a surprising size.
    """
    items = value if isinstance(value, list) else [value]
    parts: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(f"{key}: expected WIDTHxHEIGHT or a number, got {item!r}", field=key)
        parts.extend(p.strip() for p in str(item).split(","))
    out: list[tuple[int, int]] = []
    for part in parts:
        text = part.lower()
        if not text:
            continue
        if "x" in text:
            pieces = text.split("x")
            if len(pieces) != 2 or not all(p.strip().isdigit() for p in pieces):
                raise ConfigError(f"{key}: invalid resolution {part!r} (expected WIDTHxHEIGHT)", field=key)
            width, height = (int(p) for p in pieces)
        else:
            try:
                number = float(text)
            except ValueError:
                raise ConfigError(f"{key}: invalid resolution {part!r} (expected WIDTHxHEIGHT)", field=key) from None
            if number < 128:
                if number != 1:
                    raise ConfigError(
                        f"{key}: {part!r} looks like megapixels; give pixels, e.g. 1024 or 1024x1024",
                        field=key,
                    )
                number = 1024.0
            if not number.is_integer():
                raise ConfigError(f"{key}: invalid resolution {part!r}", field=key)
            width = height = int(number)
        if width <= 0 or height <= 0:
            raise ConfigError(f"{key}: invalid resolution {part!r}", field=key)
        out.append((width, height))
    if not out:
        raise ConfigError(f"{key}: no resolution given", field=key)
    return out


def _resolve_path(value: str | Path, base_dir: Path, source_path: Path | None) -> Path:
    """Relative paths resolve against base_dir (SimpleTuner: the directory train.sh runs in).

    When the file is not there but is next to the config (or its parent, for SimpleTuner's "config/…"
    style), that one is used, so a config moved out of SimpleTuner's tree keeps working.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = [base_dir / path]
    if source_path is not None:
        candidates += [source_path.parent / path, source_path.parent.parent / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def load_user_prompt_library(path: Path) -> dict[str, str]:
    """{nickname: prompt} (or {nickname: {"prompt": …}}), as SimpleTuner's PromptLibraryService."""
    key = "user_prompt_library"
    payload = read_json_file(path, what=f"{key}: prompt library file", field=key)
    if not isinstance(payload, dict):
        raise ConfigError(f"{key}: {path} must be a JSON object of nickname -> prompt", field=key)
    prompts: dict[str, str] = {}
    for raw_name, entry in payload.items():
        name = str(raw_name).strip()
        if not name:
            continue
        if isinstance(entry, dict):
            extra = sorted(k for k, v in entry.items() if k != "prompt" and v is not None)
            if extra:
                raise NotSupportedError(
                    f"not supported yet: {key} entry {name!r} in {path} sets {', '.join(extra)}", field=key
                )
            entry = entry.get("prompt")
        if not isinstance(entry, str) or not entry.strip():
            raise ConfigError(f"{key}: entry {name!r} in {path} must be a non-empty prompt string", field=key)
        prompts[name] = entry
    return prompts


def _load_lycoris_config(path: Path) -> dict[str, Any]:
    """SimpleTuner's lycoris_config: a JSON object (algo, multiplier, linear_dim, linear_alpha, factor, preset)."""
    data = read_json_file(path, what="lycoris_config file", field="lycoris_config")
    if not isinstance(data, dict):
        raise ConfigError(f"lycoris_config {path} must be a JSON object of LyCORIS settings", field="lycoris_config")
    algo = data.get("algo", "lokr")
    if algo not in LYCORIS_ALGOS:
        raise NotSupportedError(f"not supported yet: lycoris_config algo={algo!r} in {path} (stagetune runs "
                                f"{', '.join(LYCORIS_ALGOS)})", field="lycoris_config")
    return data


def _read_source(source: Path | str | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    if isinstance(source, Mapping):
        return dict(source), None
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(
            f"{WHERE} must be a JSON object of option -> value, got {_json_kind(source)}", field="config"
        )
    path = Path(source)
    data = read_json_file(path, what="config file", field="config")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must be a JSON object of option -> value, got {_json_kind(data)}", field="config"
        )
    return data, path


def config_from_json(text: str, where: str = WHERE) -> dict[str, Any]:
    """config.json as JSON text (what the gRPC API carries): a JSON object, or a ConfigError naming what it is.

    Never pass the parsed value to `load_train_config` unchecked: a JSON string would be read as a path.
    """
    try:
        data = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where} is not valid JSON: {exc}", field="config_json") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object of option -> value, got {_json_kind(data)}",
                          field="config_json")
    return data


def _json_kind(value: Any) -> str:
    """How a user would name what they wrote: 'a list', 'a string', ..."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _canonical(raw: Mapping[str, Any], what: str, warnings: list[str] | None = None) -> dict[str, tuple[str, Any]]:
    """Canonical key → (key as written, value). One option given under two spellings (a config pasted
    together from a guide's snippets: `validation_guidance` and `--validation_guidance`) takes the later
    value, as SimpleTuner's argument parser does, with a warning when the two differ."""
    out: dict[str, tuple[str, Any]] = {}
    for raw_key, value in raw.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{what}: keys must be strings, got {raw_key!r}")
        key = normalise_key(raw_key)
        key = st.ALIASES.get(key, key)
        key = st.RENAMED_LEGACY_KEYS.get(key, key)
        if key == "vae_cache_preprocess":  # SimpleTuner's old spelling: false means encode during training
            if str(value).strip().lower() not in BOOL_FALSE | {"none", ""} or value is None:
                continue
            key, value = "vae_cache_ondemand", True
        if key in out and out[key][1] != value and warnings is not None:
            warnings.append(f"{what}: {out[key][0]!r} and {raw_key!r} both set {key}: using the later, {value!r}, "
                            "as SimpleTuner does")
        out[key] = (raw_key, value)
    return out


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
    data, source_path = _read_source(source)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    problems = Collector()  # every refused key and bad value, reported together
    warnings: list[str] = []
    merged = _canonical(data, WHERE, warnings)
    for key, item in _canonical(overrides or {}, "overrides").items():
        merged[key] = item

    values: dict[str, Any] = {}
    known = SUPPORTED_KEYS | set(st.OPTIONS) | set(st.LEGACY_OPTIONS) | st.IGNORED_KEYS
    for key, (raw_key, value) in merged.items():
        with problems.check():
            value = _expand_env(value, key)
            if value is None or (isinstance(value, str) and not value.strip() and key not in ALLOW_EMPTY):
                if key not in known:
                    raise unknown_key_error(key, known, WHERE)
                continue  # SimpleTuner skips null and empty values: its default applies
            if key in st.IGNORED_KEYS:
                warnings.append(
                    f"{raw_key} is ignored in {WHERE} (SimpleTuner ignores it too; per-dataset options go in "
                    "multidatabackend.json)"
                )
                continue
            values[key] = value

    no_effect = {key: values.pop(key) for key in list(values) if key in NO_EFFECT and key not in SUPPORTED_KEYS}
    accepted = _convert_no_effect(no_effect, warnings, problems)
    family_keys = all_option_keys()
    family_values = {key: values.pop(key) for key in list(values) if key in family_keys}
    unsupported = (set(st.OPTIONS) | set(st.LEGACY_OPTIONS)) - SUPPORTED_KEYS - NO_EFFECT.keys() - family_keys
    inert = {key: (values[key],) for key in unsupported & values.keys() if is_default(key, values[key])}
    given = check_keys(
        values,
        supported=SUPPORTED_KEYS | family_keys,  # (family keys were taken out above; here for suggestions)
        recognised_unsupported=unsupported,
        where=WHERE,
        inert_values=inert,
        problems=problems,
    )

    fields = _convert_supported(given, problems)
    explicit = frozenset(fields)
    if str(given.get("optimizer", "")).strip().lower() == "adafactor":
        warnings.append("optimizer=adafactor is SimpleTuner's old name: using torch-adafactor (torch.optim.Adafactor), "
                        "the optimizer SimpleTuner moved it to")
    _check_required(fields, problems, warnings)

    fields["output_dir"] = _output_dir(fields.get("output_dir", _default("output_dir")), base)
    if "data_backend_config" in fields:
        fields["data_backend_config"] = _resolve_path(fields["data_backend_config"], base, source_path)
    if "init_lora" in fields:
        fields["init_lora"] = _resolve_path(fields["init_lora"], base, source_path)
    if fields.get("lora_type") == "lycoris" and fields.get("model_type", _default("model_type")) == "lora":
        lycoris = _resolve_path(fields.get("lycoris_config", _default("lycoris_config")), base, source_path)
        fields["lycoris_config"] = lycoris
        with problems.check():
            fields["lycoris"] = _load_lycoris_config(lycoris)
    if "user_prompt_library" in fields:
        library = _resolve_path(fields["user_prompt_library"], base, source_path)
        fields["user_prompt_library"] = library
        with problems.check():
            fields["user_prompts"] = load_user_prompt_library(library)

    with problems.check():
        _cross_check(fields, explicit, warnings)
    fields["family_options"] = _family_options(fields, family_values, problems, warnings)

    config = None
    try:
        config = TrainConfig(
            **fields, base_dir=base, source_path=source_path, explicit_keys=explicit, warnings=warnings,
            no_effect=accepted,
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


def _family_options(fields: Mapping[str, Any], given: Mapping[str, Any], problems: Collector,
                    warnings: list[str]) -> dict[str, Any]:
    """The configured family reads its own keys; another family's keys change nothing here (noted)."""
    name = fields.get("model_family")
    if name not in family_names():
        return {}
    family = get_family(name)
    own = {key: value for key, value in given.items() if key in family.option_keys}
    for key in sorted(set(given) - set(own)):
        warnings.append(f"{key} changes nothing for model_family={name}: it belongs to another model family")
    context = {key: fields.get(key, _default(key)) for key in ("validation_guidance", "validation_num_inference_steps")}
    return family.parse_options(own, context=context, problems=problems, warnings=warnings)


def _output_dir(value: Any, base: Path) -> Path | str:
    """A URL stays a string (a Path would fold `s3://` into `s3:/`, a local folder named "s3:")."""
    if "://" in str(value):
        return str(value)
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _check_required(fields: dict[str, Any], problems: Collector, warnings: list[str]) -> None:
    """Keys SimpleTuner cannot do without (or whose default stagetune does not offer)."""
    if "model_family" not in fields and "model_family" not in problems.fields():
        problems.add(ConfigError(f"model_family is required in {WHERE} (stagetune supports "
                                 f"{', '.join(family_names())})",
                                 field="model_family"))
    if "pretrained_model_name_or_path" not in fields:
        problems.add(ConfigError(
            f"pretrained_model_name_or_path is required in {WHERE}", field="pretrained_model_name_or_path"
        ))


def _convert_no_effect(given: Mapping[str, Any], warnings: list[str], problems: Collector) -> dict[str, Any]:
    """Check no-effect options as SimpleTuner parses them; note the ones set away from its default."""
    accepted: dict[str, Any] = {}
    for key, value in given.items():
        with problems.check():
            option = _opt(key)
            converted = coerce(key, value, option.type)
            if isinstance(converted, str):
                converted = converted.strip()
            check_choice(key, converted, option.choices)
            accepted[key] = converted
            if not is_default(key, value):
                warnings.append(f"{key}={show(converted)} changes nothing here: {NO_EFFECT[key]}")
    return accepted


def _convert_supported(given: Mapping[str, Any], problems: Collector) -> dict[str, Any]:
    """Typed values for TrainConfig, with SimpleTuner's value rules and our not-supported-yet checks."""
    fields: dict[str, Any] = {}
    for key, value in given.items():
        with problems.check():
            _convert_one(key, value, fields)
    return fields


def _convert_one(key: str, value: Any, fields: dict[str, Any]) -> None:
    """One option's typed value into `fields` (under its TrainConfig name)."""
    option = _opt(key)
    name = FIELD_FOR_KEY.get(key, key)
    special = {
        "optimizer": _convert_optimizer,
        "optimizer_config": _convert_optimizer_config,
        "validation_resolution": parse_validation_resolution,
        "resume_from_checkpoint": _convert_resume,
    }
    if key in special:
        fields[name] = special[key](value)
        return
    if key in ("resolution", "minimum_image_size", "maximum_image_size", "target_downsample_size"):
        # pixels (int) or, with resolution_type "area", megapixels (float), as in multidatabackend.json
        number = coerce(key, value, "float")
        fields[name] = int(number) if number.is_integer() and not _is_float_literal(value) else number
        return
    converted = coerce(key, value, option.type)
    if isinstance(converted, str):
        converted = converted.strip()
    if key == "lr_scheduler" and converted == "cosine_with_warmup":
        converted = "cosine"  # SimpleTuner's alias
    if key == "caption_strategy" and converted == "instance_prompt":
        converted = "instanceprompt"
    choices = option.choices
    if key == "caption_strategy":
        choices = (*(choices or ()), "instanceprompt")
    check_choice(key, converted, choices, SUPPORTED_VALUES.get(key))
    if key == "validation_prompt" and converted == "":
        converted = None
    fields[name] = converted


def _is_float_literal(value: Any) -> bool:
    return isinstance(value, float) or (isinstance(value, str) and any(c in value for c in ".eE"))


def _convert_optimizer(value: Any) -> str:
    key = "optimizer"
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected an optimizer name, got {value!r}", field=key)
    name = canonical_name(value)
    if name in SUPPORTED_OPTIMIZERS:
        return name
    if name in st.OPTIMIZERS:
        raise NotSupportedError(f"not supported yet: optimizer={name} (stagetune runs {len(SUPPORTED_OPTIMIZERS)} of "
                                "SimpleTuner's optimizers; see the README)", field=key)
    hint = suggest(name, [*SUPPORTED_OPTIMIZERS, *OPTIMIZER_ALIASES])
    message = f"{key}: unknown optimizer {name!r}"
    if hint:
        message += f" (did you mean {hint!r}?)"
    raise ConfigError(message, field=key)


def _convert_optimizer_config(value: Any) -> str:
    text = value if isinstance(value, str) else ",".join(f"{k}={v}" for k, v in dict(value).items()) \
        if isinstance(value, Mapping) else None
    if text is None:
        raise ConfigError(f"optimizer_config: expected \"key=value,...\", got {value!r}", field="optimizer_config")
    parse_optimizer_config(text)  # the form is checked now; the optimizer checks the settings when built
    return text


def _convert_resume(value: Any) -> str | None:
    if isinstance(value, bool):
        if value:
            return "latest"
        return None
    text = str(value).strip()
    if text.lower() in {"none", "false", "no", "off"}:
        return None
    if text.lower() == "latest":
        return "latest"
    return text


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


def _cross_check(fields: dict[str, Any], explicit: frozenset[str], warnings: list[str]) -> None:
    """Rules between options that SimpleTuner applies at startup, or that would silently do nothing."""
    max_steps = fields.get("max_train_steps")
    epochs = fields.get("num_train_epochs", _default("num_train_epochs"))
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
    scheduler = fields.get("lr_scheduler", _default("lr_scheduler"))
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
    report_to = fields.get("report_to", _default("report_to"))
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

"""SimpleTuner's `multidatabackend.json`, read unchanged.

Users bring the file they already train with, so every key SimpleTuner documents (DATALOADER.md and
`helpers/data_backend/config/*.py`) is *recognised*: the ones stagetune implements work, the rest raise
"not supported yet: KEY" unless set to a value that changes nothing, and unknown keys raise an error with
the closest known key. Silently ignoring a key would train on a different dataset than the user wrote.

`cache_dir_vae` (image datasets) and `cache_dir` (text_embeds) are accepted and recorded but not used:
stagetune's latent and embedding caches are content-addressed in the object store
(`cache/vae/<fingerprint>/`, `cache/text/<fingerprint>/`), so a folder per dataset is not needed and two
datasets over the same images share their latents. `skip_file_discovery` is accepted for the same reason:
ingest's manifest is keyed by the listing, so an unchanged dataset is never re-bucketed anyway.

`pixel_area` is converted as SimpleTuner does (DESIGN.md §6): a resolution of E pixels means E²/1e6
megapixels, and `minimum_image_size`, `maximum_image_size` and `target_downsample_size` above 10 are
pixel edges converted the same way (values ≤ 10 are taken as megapixels already).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagetune.core.config.conditioning import check_pairs, conditioning_fields
from stagetune.core.config.dataset_keys import (
    BACKEND_TYPES_LATER,
    CAPTION_STRATEGIES,
    CAPTION_STRATEGIES_LATER,
    CROP_ASPECTS,
    CROP_ASPECTS_LATER,
    CROP_STYLES,
    CROP_STYLES_LATER,
    DATASET_NO_EFFECT,
    DATASET_TYPES_LATER,
    GLOBAL_DEFAULTS,
    IMAGE_KEYS_RECOGNISED,
    IMAGE_KEYS_SUPPORTED,
    INERT_VALUES,
    METADATA_BACKENDS,
    METADATA_BACKENDS_LATER,
    RESOLUTION_TYPES,
    TEXT_EMBEDS_KEYS_RECOGNISED,
    TEXT_EMBEDS_KEYS_SUPPORTED,
)
from stagetune.core.config.dataset_values import (
    AspectBucket,
    ParquetConfig,
    as_bool,
    as_choice,
    as_int,
    as_number,
    aws_fields,
    dataset_label,
    load_caption_filter_list,
    optional_str,
    parse_crop_aspect_buckets,
    parse_parquet_config,
    parse_skip_file_discovery,
    positive_int,
    resolve_path,
)
from stagetune.core.config.files import read_json_file
from stagetune.core.config.keys import check_keys, normalise_key
from stagetune.core.errors import Collector, ConfigError

#: The keys of `report["datasets"][id]["sampling"]`: trainer/sampler settings ingest validates and records.
SAMPLING_KEYS = (
    "probability",
    "start_step",
    "end_step",
    "train_batch_size",
    "is_regularisation_data",
    "vae_cache_clear_each_epoch",
)



@dataclass(frozen=True)
class DatasetConfig:
    """One image dataset with every inherited default resolved, so later stages never look at config.json."""

    id: str
    instance_data_dir: Path | None
    type: str = "local"
    # type: aws (SimpleTuner's S3 datasets). Secrets stay out of repr and of the manifest's hash.
    aws_bucket_name: str | None = None
    aws_data_prefix: str | None = None
    aws_endpoint_url: str | None = None
    aws_region_name: str | None = None
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)
    aws_max_pool_connections: int | None = None
    dataset_type: str = "image"
    disabled: bool = False
    crop: bool = False
    crop_aspect: str = "square"
    crop_style: str = "random"
    resolution: float = 1024
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    caption_strategy: str = "filename"
    instance_prompt: str | tuple[str, ...] | None = None
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    disable_multiline_split: bool = False
    metadata_backend: str = "discovery"
    repeats: int = 0
    #: The entry sets `repeats` itself: allow_dataset_oversubscription then leaves it alone (as SimpleTuner).
    repeats_set: bool = False
    is_regularisation_data: bool = False
    probability: float = 1.0
    vae_batch_size: int | None = None
    #: Recorded, not used: caches are content-addressed in the store.
    cache_dir_vae: str | None = None
    #: Recorded, not used: the manifest is keyed by the listing, so nothing is rescanned needlessly.
    skip_file_discovery: str = ""
    #: Recorded, not used: ingest keeps no listing cache file that a launch would remove.
    preserve_data_backend_cache: bool = False
    crop_aspect_buckets: tuple[AspectBucket, ...] = ()
    max_upscale_threshold: float | None = None
    max_num_samples: int | None = None
    #: Sampler settings, recorded per dataset in the manifest report for the trainer.
    start_step: int = 0
    end_step: int | None = None
    train_batch_size: int | None = None
    vae_cache_clear_each_epoch: bool = False
    #: Only when true may ingest delete a file it cannot read as an image (SimpleTuner's option).
    delete_problematic_images: bool = False
    #: Image datasets: the conditioning dataset(s) paired with this one (SimpleTuner's `conditioning_data`);
    #: a `conditioning_type: mask` one masks the loss (masked loss: DREAMBOOTH.md).
    conditioning_data: tuple[str, ...] = ()
    #: Conditioning datasets (`dataset_type: conditioning`): what they condition; stagetune runs `mask`.
    conditioning_type: str | None = None
    parquet: ParquetConfig | None = None

    # -- the units bucketing works in (DESIGN.md §6) --------------------------------------------------
    @property
    def bucket_mode(self) -> str:
        """`pixel` or `area`: `pixel_area` is `area` measured in pixel edges."""
        return "pixel" if self.resolution_type == "pixel" else "area"

    @property
    def bucket_resolution(self) -> float:
        """Pixels (short edge) in pixel mode, megapixels in area mode."""
        if self.resolution_type == "pixel_area":
            return float(self.resolution) ** 2 / 1e6
        return float(self.resolution)

    def _size_in_bucket_units(self, value: float | None) -> float | None:
        if not value:  # SimpleTuner: 0 / "" / null all mean "no limit"
            return None
        value = float(value)
        if self.resolution_type == "pixel_area" and value > 10:
            return value * value / 1e6
        return value

    @property
    def bucket_minimum_image_size(self) -> float | None:
        return self._size_in_bucket_units(self.minimum_image_size)

    @property
    def bucket_maximum_image_size(self) -> float | None:
        return self._size_in_bucket_units(self.maximum_image_size)

    @property
    def bucket_target_downsample_size(self) -> float | None:
        return self._size_in_bucket_units(self.target_downsample_size)

    @property
    def instance_prompts(self) -> list[str]:
        if self.instance_prompt is None:
            return []
        if isinstance(self.instance_prompt, str):
            return [self.instance_prompt.strip()] if self.instance_prompt.strip() else []
        return [p.strip() for p in self.instance_prompt if p.strip()]

    def sampling(self, global_train_batch_size: int) -> dict[str, Any]:
        """The sampler settings the trainer applies to this dataset, with the global batch size resolved."""
        return {
            "probability": self.probability,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "train_batch_size": self.train_batch_size or global_train_batch_size,
            "is_regularisation_data": self.is_regularisation_data,
            "vae_cache_clear_each_epoch": self.vae_cache_clear_each_epoch,
        }

    def ingest_options(self) -> dict[str, Any]:
        """Everything that changes ingest's output (the manifest and its report), for the manifest's hash.

        The sampling settings are in it too: the report records them, and a reused manifest must not
        carry a stale probability. So is `delete_problematic_images`: its report says what was deleted.
        """
        skip = {
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_session_token",
            "aws_max_pool_connections",
            "cache_dir_vae",
            "skip_file_discovery",
            "preserve_data_backend_cache",
            "vae_batch_size",
            "disabled",
        }
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            if name in skip:
                continue
            value = getattr(self, name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, ParquetConfig):
                value = value.options()
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[name] = value
        return out


@dataclass(frozen=True)
class TextEmbedsConfig:
    """The `text_embeds` entry: where SimpleTuner put its text cache; here only `write_batch_size` matters."""

    id: str
    type: str = "local"
    default: bool = False
    disabled: bool = False
    #: Recorded, not used: embeddings live under `cache/text/<encoder-fingerprint>/` in the store.
    cache_dir: str | None = None
    write_batch_size: int | None = None
    #: SimpleTuner applies it to every caption encoded through this entry; ingest applies the default
    #: entry's list to the captions it writes (already loaded from its file, so a bad path fails early).
    caption_filter_list: tuple[str, ...] = ()
    #: Recorded, not used.
    preserve_data_backend_cache: bool = False


@dataclass(frozen=True)
class DataBackends:
    """All entries of one multidatabackend.json."""

    datasets: tuple[DatasetConfig, ...]
    text_embeds: tuple[TextEmbedsConfig, ...] = ()
    source: str | None = None

    @property
    def enabled(self) -> list[DatasetConfig]:
        """The datasets that are trained on (conditioning datasets are read through the ones they pair with)."""
        return [d for d in self.datasets if not d.disabled and d.dataset_type == "image"]

    @property
    def read(self) -> list[DatasetConfig]:
        """Every dataset a run reads: the trained ones and their mask datasets."""
        masks = [mask for d in self.enabled if (mask := self.mask_for(d)) is not None]
        return self.enabled + [m for i, m in enumerate(masks) if m not in masks[:i]]

    def mask_for(self, dataset: DatasetConfig) -> DatasetConfig | None:
        """The mask dataset paired with `dataset` (masked loss), if any."""
        for dataset_id in dataset.conditioning_data:
            paired = self.get(dataset_id)
            if paired.conditioning_type == "mask" and not paired.disabled:
                return paired
        return None

    @property
    def default_text_embeds(self) -> TextEmbedsConfig | None:
        enabled = [t for t in self.text_embeds if not t.disabled]
        for entry in enabled:
            if entry.default:
                return entry
        return enabled[0] if enabled else None

    def get(self, dataset_id: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.id == dataset_id:
                return dataset
        raise KeyError(dataset_id)
def _parse_image_dataset(
    entry: Mapping[str, Any], defaults: Mapping[str, Any], base_dir: Path | None
) -> DatasetConfig:
    dataset_id = str(entry["id"])
    where = dataset_label(dataset_id)
    filters = {normalise_key(k): v for k, v in entry.items()}.get("caption_filter_list")
    if filters not in (None, "", []):
        raise ConfigError(
            f"{where}: caption_filter_list belongs on the text_embeds entry (SimpleTuner rejects it on "
            f"image datasets too); it filters every caption encoded through that entry",
            field="caption_filter_list",
        )
    data = check_keys(
        entry,
        supported=IMAGE_KEYS_SUPPORTED | DATASET_NO_EFFECT,
        recognised_unsupported=IMAGE_KEYS_RECOGNISED - DATASET_NO_EFFECT,
        inert_values=INERT_VALUES,
        where=where,
    )

    def pick(key: str) -> Any:
        value = data.get(key)
        return defaults.get(key, GLOBAL_DEFAULTS.get(key)) if value is None else value

    dataset_type = as_choice(
        data.get("dataset_type") or "image", dataset_id, "dataset_type", ("image", "conditioning"), DATASET_TYPES_LATER
    )
    config = DatasetConfig(
        id=dataset_id,
        **_source_fields(data, pick, dataset_id, base_dir),
        dataset_type=dataset_type,
        disabled=as_bool(data.get("disabled", data.get("disable", False)), dataset_id, "disabled"),
        **_geometry_fields(data, pick, dataset_id),
        **_caption_fields(data, pick, dataset_id, base_dir),
        **_sampling_fields(data, pick, dataset_id),
        **conditioning_fields(data, dataset_id, dataset_type),
    )
    _validate_image_dataset(config)
    return config


def _source_fields(data: Mapping[str, Any], pick: Any, dataset_id: str, base_dir: Path | None) -> dict[str, Any]:
    """Where the images are: a local folder, or an S3 prefix (`type: aws`)."""
    backend_type = as_choice(data.get("type", "local"), dataset_id, "type", ("local", "aws"), BACKEND_TYPES_LATER)
    raw_dir = data.get("instance_data_dir")
    instance_dir: Path | None = None
    if backend_type == "aws":
        if not data.get("aws_bucket_name") or not isinstance(data.get("aws_bucket_name"), str):
            raise ConfigError(f"{dataset_label(dataset_id)}: aws_bucket_name is required for type 'aws'",
                              field="aws_bucket_name")
    elif not raw_dir or not isinstance(raw_dir, str):
        raise ConfigError(
            f"{dataset_label(dataset_id)}: instance_data_dir is required (a local folder)", field="instance_data_dir"
        )
    else:
        instance_dir = resolve_path(raw_dir, base_dir)
    return {"instance_data_dir": instance_dir, "type": backend_type, **aws_fields(data, dataset_id),
            "skip_file_discovery": parse_skip_file_discovery(data.get("skip_file_discovery"), dataset_id),
            "max_num_samples": positive_int(data.get("max_num_samples"), dataset_id, "max_num_samples"),
            "delete_problematic_images": as_bool(pick("delete_problematic_images"), dataset_id,
                                                 "delete_problematic_images")}


def _geometry_fields(data: Mapping[str, Any], pick: Any, dataset_id: str) -> dict[str, Any]:
    """Resolution, size limits and crops: what decides each image's bucket and pixels."""
    resolution_type = as_choice(pick("resolution_type"), dataset_id, "resolution_type", RESOLUTION_TYPES)
    resolution = as_number(pick("resolution"), dataset_id, "resolution", allow_none=False)
    assert resolution is not None
    if resolution <= 0:
        raise ConfigError(f"{dataset_label(dataset_id)}: resolution must be > 0", field="resolution")
    crop_style = as_choice(pick("crop_style"), dataset_id, "crop_style", CROP_STYLES, CROP_STYLES_LATER)
    max_upscale = as_number(data.get("max_upscale_threshold"), dataset_id, "max_upscale_threshold")
    numbers = ("minimum_image_size", "maximum_image_size", "target_downsample_size")
    ratios = ("minimum_aspect_ratio", "maximum_aspect_ratio")
    return {
        "crop": as_bool(pick("crop"), dataset_id, "crop"),
        "crop_aspect": as_choice(pick("crop_aspect"), dataset_id, "crop_aspect", CROP_ASPECTS, CROP_ASPECTS_LATER),
        "crop_style": "center" if crop_style == "centre" else crop_style,
        "resolution": resolution,
        "resolution_type": resolution_type,
        **{key: as_number(pick(key), dataset_id, key) for key in numbers},
        **{key: as_number(data.get(key), dataset_id, key) for key in ratios},
        "crop_aspect_buckets": parse_crop_aspect_buckets(data.get("crop_aspect_buckets"), dataset_id),
        "max_upscale_threshold": None if max_upscale is None else float(max_upscale),
        "cache_dir_vae": optional_str(data.get("cache_dir_vae"), dataset_id, "cache_dir_vae"),
        "preserve_data_backend_cache": as_bool(data.get("preserve_data_backend_cache"), dataset_id,
                                               "preserve_data_backend_cache"),
    }


def _caption_fields(data: Mapping[str, Any], pick: Any, dataset_id: str, base_dir: Path | None
                    ) -> dict[str, Any]:
    """Where captions come from: file names, text files, instance prompts or a caption table."""
    instance_prompt: str | tuple[str, ...] | None
    raw_prompt = pick("instance_prompt")
    if raw_prompt is None or isinstance(raw_prompt, str):
        instance_prompt = raw_prompt
    elif isinstance(raw_prompt, list) and all(isinstance(p, str) for p in raw_prompt):
        instance_prompt = tuple(raw_prompt)
    else:
        raise ConfigError(
            f"{dataset_label(dataset_id)}: instance_prompt must be a string or a list of strings",
            field="instance_prompt",
        )
    flags = ("prepend_instance_prompt", "only_instance_prompt", "disable_multiline_split")
    return {
        "caption_strategy": as_choice(pick("caption_strategy"), dataset_id, "caption_strategy", CAPTION_STRATEGIES,
                                      CAPTION_STRATEGIES_LATER),
        "instance_prompt": instance_prompt,
        **{flag: as_bool(data.get(flag), dataset_id, flag) for flag in flags},
        "metadata_backend": as_choice(data.get("metadata_backend") or "discovery", dataset_id, "metadata_backend",
                                      METADATA_BACKENDS, METADATA_BACKENDS_LATER),
        "parquet": parse_parquet_config(data.get("parquet"), dataset_id, base_dir),
    }


def _sampling_fields(data: Mapping[str, Any], pick: Any, dataset_id: str) -> dict[str, Any]:
    """How often and when the dataset is drawn, and how its batches and latents are made."""
    reg_raw = data.get("is_regularisation_data", data.get("is_regularization_data", False))
    repeats = as_int(data.get("repeats"), dataset_id, "repeats", 0)
    # SimpleTuner: unset or "" means 1.0; 0 is kept (the dataset is then never drawn).
    probability = as_number(data.get("probability"), dataset_id, "probability")
    return {
        "repeats": repeats,
        "repeats_set": "repeats" in data,
        "is_regularisation_data": as_bool(reg_raw, dataset_id, "is_regularisation_data"),
        "probability": 1.0 if probability is None else float(probability),
        "vae_batch_size": as_int(data.get("vae_batch_size"), dataset_id, "vae_batch_size", None),
        "start_step": as_int(data.get("start_step"), dataset_id, "start_step", 0) or 0,
        # SimpleTuner: 0 (or unset) means "no end".
        "end_step": as_int(data.get("end_step"), dataset_id, "end_step", None) or None,
        "train_batch_size": positive_int(data.get("train_batch_size"), dataset_id, "train_batch_size"),
        "vae_cache_clear_each_epoch": as_bool(data.get("vae_cache_clear_each_epoch"), dataset_id,
                                              "vae_cache_clear_each_epoch"),
    }


def _validate_image_dataset(config: DatasetConfig) -> None:
    """SimpleTuner's own sanity checks (config/base.py, metadata/backends/base.py), raised at load time."""
    where = dataset_label(config.id)
    if config.repeats < 0:
        raise ConfigError(f"{where}: repeats must be ≥ 0, got {config.repeats}", field="repeats")
    needs_prompt = (
        config.caption_strategy == "instanceprompt"
        or config.only_instance_prompt
        or config.prepend_instance_prompt
    )
    if needs_prompt and not config.instance_prompts:
        reason = (
            "caption_strategy=instanceprompt"
            if config.caption_strategy == "instanceprompt"
            else "only_instance_prompt"
            if config.only_instance_prompt
            else "prepend_instance_prompt"
        )
        raise ConfigError(f"{where}: {reason} requires a non-empty instance_prompt", field="instance_prompt")
    if config.crop_aspect in ("closest", "random") and not config.crop_aspect_buckets:
        raise ConfigError(
            f"{where}: crop_aspect={config.crop_aspect} needs crop_aspect_buckets (a list of aspect ratios)",
            field="crop_aspect_buckets",
        )
    if config.end_step is not None and config.start_step > 0 and config.end_step < config.start_step:
        raise ConfigError(
            f"{where}: end_step ({config.end_step}) must be ≥ start_step ({config.start_step})", field="end_step"
        )
    if config.caption_strategy == "parquet" and config.metadata_backend != "parquet":
        raise ConfigError(
            f"{where}: caption_strategy=parquet needs metadata_backend=parquet (as in SimpleTuner); "
            f"with {config.metadata_backend}, use caption_strategy=textfile",
            field="metadata_backend",
        )
    if config.metadata_backend == "parquet" and config.parquet is None:
        raise ConfigError(
            f"{where}: metadata_backend=parquet needs a parquet block with path, filename_column, caption_column",
            field="parquet",
        )
    if config.maximum_image_size and not config.target_downsample_size:
        raise ConfigError(
            f"{where}: maximum_image_size needs target_downsample_size as well (as in SimpleTuner)",
            field="target_downsample_size",
        )
    mode = config.resolution_type
    for key in ("maximum_image_size", "target_downsample_size"):
        value = getattr(config, key)
        if not value:
            continue
        if mode == "area" and value >= 20:
            raise ConfigError(
                f"{where}: with resolution_type=area, {key} is in megapixels and must be < 20; "
                f"{value} looks like pixels",
                field=key,
            )
        if mode == "pixel" and value < 512:
            raise ConfigError(
                f"{where}: with resolution_type=pixel, {key} is in pixels and must be ≥ 512; "
                f"{value} looks like megapixels",
                field=key,
            )
    if mode == "area" and config.minimum_image_size and config.minimum_image_size > 5:
        raise ConfigError(
            f"{where}: with resolution_type=area, minimum_image_size is in megapixels and must be ≤ 5; "
            f"{config.minimum_image_size} looks like pixels",
            field="minimum_image_size",
        )
    if mode == "area" and config.resolution > 20:
        raise ConfigError(
            f"{where}: with resolution_type=area, resolution is in megapixels; "
            f"{config.resolution} looks like pixels (use resolution_type=pixel_area)",
            field="resolution",
        )


def _parse_text_embeds(entry: Mapping[str, Any], base_dir: Path | None = None) -> TextEmbedsConfig:
    dataset_id = str(entry["id"])
    where = dataset_label(dataset_id)
    data = check_keys(
        entry,
        supported=TEXT_EMBEDS_KEYS_SUPPORTED | DATASET_NO_EFFECT,
        recognised_unsupported=TEXT_EMBEDS_KEYS_RECOGNISED - DATASET_NO_EFFECT,
        inert_values=INERT_VALUES,
        where=where,
    )
    backend_type = as_choice(data.get("type", "local"), dataset_id, "type", ("local",), ("aws", *BACKEND_TYPES_LATER))
    return TextEmbedsConfig(
        id=dataset_id,
        type=backend_type,
        default=as_bool(data.get("default"), dataset_id, "default"),
        disabled=as_bool(data.get("disabled", data.get("disable", False)), dataset_id, "disabled"),
        cache_dir=optional_str(data.get("cache_dir"), dataset_id, "cache_dir"),
        write_batch_size=as_int(data.get("write_batch_size"), dataset_id, "write_batch_size", None),
        caption_filter_list=load_caption_filter_list(data.get("caption_filter_list"), where, base_dir),
        preserve_data_backend_cache=as_bool(
            data.get("preserve_data_backend_cache"), dataset_id, "preserve_data_backend_cache"
        ),
    )


def _parse_entry(index: int, entry: Any, seen: set[str], defaults: Mapping[str, Any], base_dir: Path | None
                 ) -> DatasetConfig | TextEmbedsConfig:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"entry {index} of the data backend config is not an object", field="data_backend_config")
    normalised = {normalise_key(k): v for k, v in entry.items()}
    raw_id = normalised.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise ConfigError(f"entry {index} of the data backend config has no 'id'", field="id")
    if raw_id in seen:
        raise ConfigError(f"dataset id {raw_id!r} is used twice", field="id")
    seen.add(raw_id)
    dataset_type = str(normalised.get("dataset_type") or "image").strip().lower()
    if dataset_type == "text_embeds":
        return _parse_text_embeds(entry, base_dir)
    return _parse_image_dataset(entry, defaults, base_dir)


def load_data_backend_config(
    source: Path | str | list[Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    base_dir: Path | None = None,
) -> DataBackends:
    """Read a multidatabackend.json (path or already-parsed list) into typed, validated configs.

    `defaults` are config.json's values (any `--key` spelling) that datasets inherit when they do not set
    them. Relative `instance_data_dir` resolves against `base_dir` (default: the current directory, as
    SimpleTuner, which resolves them against where `train.sh` runs).
    """
    source_name: str | None = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        source_name = str(path)
        entries = read_json_file(path, what="data backend config", field="data_backend_config")
    else:
        entries = source
    if not isinstance(entries, list):
        kind = {dict: "an object", str: "a string"}.get(type(entries), type(entries).__name__)
        raise ConfigError(
            f"{source_name or 'multidatabackend.json'} must be a JSON list of dataset objects, got {kind}",
            field="data_backend_config",
        )
    global_defaults = {normalise_key(k): v for k, v in (defaults or {}).items()}
    global_defaults = {k: v for k, v in global_defaults.items() if k in GLOBAL_DEFAULTS}

    datasets: list[DatasetConfig] = []
    text_embeds: list[TextEmbedsConfig] = []
    seen: set[str] = set()
    problems = Collector()  # every entry is checked, and all their problems reported at once
    for index, entry in enumerate(entries):
        with problems.check():
            parsed = _parse_entry(index, entry, seen, global_defaults, base_dir)
            (text_embeds if isinstance(parsed, TextEmbedsConfig) else datasets).append(parsed)
    problems.raise_if_any(source_name or "multidatabackend.json")

    enabled_text = [t for t in text_embeds if not t.disabled]
    if not enabled_text:
        raise ConfigError(
            "the data backend config needs a text_embeds entry (dataset_type: text_embeds), "
            "as SimpleTuner requires",
            field="dataset_type",
        )
    defaults_marked = [t.id for t in enabled_text if t.default]
    if len(defaults_marked) > 1:
        raise ConfigError(
            f"only one text_embeds entry can be the default; marked: {', '.join(defaults_marked)}",
            field="default",
        )
    if not defaults_marked and len(enabled_text) > 1:
        raise ConfigError('several text_embeds entries and none marked "default": true', field="default")
    problems = Collector()
    check_pairs(datasets, problems)
    problems.raise_if_any(source_name or "multidatabackend.json")
    enabled = [d for d in datasets if not d.disabled and d.dataset_type == "image"]
    if not enabled:
        raise ConfigError("the data backend config has no enabled image dataset", field="dataset_type")
    if not any(d.start_step <= 1 for d in enabled):
        raise ConfigError(
            "at least one dataset must be available at the start of training (start_step ≤ 1), "
            "as SimpleTuner requires",
            field="start_step",
        )
    if not any(d.probability > 0 for d in enabled):
        raise ConfigError("every enabled dataset has probability 0: nothing would be sampled", field="probability")
    return DataBackends(datasets=tuple(datasets), text_embeds=tuple(text_embeds), source=source_name)


__all__ = [
    "SAMPLING_KEYS",
    "AspectBucket",
    "DataBackends",
    "DatasetConfig",
    "GLOBAL_DEFAULTS",
    "ParquetConfig",
    "TextEmbedsConfig",
    "load_caption_filter_list",
    "load_data_backend_config",
]

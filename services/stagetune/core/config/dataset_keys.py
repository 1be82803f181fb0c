"""The keys of SimpleTuner's multidatabackend.json entries as stagetune sorts them (supported, without effect,
recognised but not yet supported, inert values) and the choices and defaults of the supported ones."""

from __future__ import annotations

from typing import Any

#: The S3 connection keys (SimpleTuner's `type: aws`), read by image and text-embed datasets alike.
AWS_KEYS = frozenset({
    "aws_access_key_id", "aws_bucket_name", "aws_data_prefix", "aws_endpoint_url", "aws_max_pool_connections",
    "aws_region_name", "aws_secret_access_key", "aws_session_token",
})
IMAGE_KEYS_SUPPORTED = frozenset(
    {
        "id",
        "type",
        "dataset_type",
        "disabled",
        "disable",
        "instance_data_dir",
        "crop",
        "crop_aspect",
        "crop_style",
        "resolution",
        "resolution_type",
        "minimum_image_size",
        "maximum_image_size",
        "target_downsample_size",
        "minimum_aspect_ratio",
        "maximum_aspect_ratio",
        "cache_dir_vae",
        "skip_file_discovery",
        "caption_strategy",
        "metadata_backend",
        "instance_prompt",
        "prepend_instance_prompt",
        "only_instance_prompt",
        "disable_multiline_split",
        "repeats",
        "is_regularisation_data",
        "is_regularization_data",
        "vae_batch_size",
        "probability",
        "crop_aspect_buckets",
        "max_upscale_threshold",
        "max_num_samples",
        "start_step",
        "end_step",
        "train_batch_size",
        "vae_cache_clear_each_epoch",
        "preserve_data_backend_cache",
        "delete_problematic_images",
        "parquet",
        "conditioning_data",
        "conditioning_type",
    }
) | AWS_KEYS

#: Dataset keys that change nothing about what is trained here (caches are content-addressed in the store,
#: encoding happens before training or on demand with the same result): accepted at any value, as
#: config/no_effect.py does for config.json.
DATASET_NO_EFFECT = frozenset(
    {
        "cache_dir",
        "compress_cache",
        "metadata_update_interval",
        "scan_for_errors",
        "disable_validation",
        "write_batch_size",
        "text_encoder_batch_size",
        "vae_cache_ondemand",
        "text_cache_ondemand",
    }
)

# Every other dataset key SimpleTuner knows (DATALOADER.md headings, ImageBackendConfig fields and the
# keys factory.py / builders read). Accepted only at the inert value listed in INERT_VALUES.
IMAGE_KEYS_RECOGNISED = frozenset(
    {
        "audio",
        "cache_dir",
        "cache_dir_conditioning_image_embeds",
        "cache_file_suffix",
        "caption_filter_list",
        "caption_shuffle",
        "compress_cache",
        "conditioning",
        "conditioning_config",
        "conditioning_image_embed_batch_size",
        "conditioning_image_embeds",
        "csv_cache_dir",
        "csv_caption_column",
        "csv_file",
        "csv_hash_filenames",
        "csv_shorten_filenames",
        "csv_url_column",
        "dataset_name",
        "default",
        "delete_nsfw_images",
        "delete_unwanted_images",
        "disable_validation",
        "end_epoch",
        "hash_filenames",
        "huggingface",
        "image_column",
        "image_embeds",
        "metadata_update_interval",
        "revision",
        "scan_for_errors",
        "shorten_filenames",
        "slider_strength",
        "source_dataset_id",
        "split",
        "start_epoch",
        "text_embeds",
        "timestep_sampling_offset",
        "vae_cache_disable",
        "vae_cache_ondemand",
        "vae_cache_scan_behaviour",
        "video",
        "video_column",
        "webshart",
        "write_batch_size",
        "text_encoder_batch_size",
        "text_cache_ondemand",
        "text_cache_disable",
    }
)

TEXT_EMBEDS_KEYS_SUPPORTED = frozenset(
    {
        "id",
        "type",
        "dataset_type",
        "default",
        "cache_dir",
        "disabled",
        "disable",
        "write_batch_size",
        "caption_filter_list",
        "preserve_data_backend_cache",
    }
)
TEXT_EMBEDS_KEYS_RECOGNISED = frozenset(
    {
        "compress_cache",
        "text_cache_ondemand",
        "text_cache_disable",
        "text_encoder_batch_size",
        "aws",
        "memory_filesystem_path",
        "memory_filesystem_size",
        "memory_filesystem_sudo",
    }
) | AWS_KEYS

_FALSY = (None, False, "", [], {}, 0)
INERT_VALUES: dict[str, tuple[Any, ...]] = {
    **{key: _FALSY for key in IMAGE_KEYS_RECOGNISED | TEXT_EMBEDS_KEYS_RECOGNISED},
    "split": (None, "train"),
    "image_column": (None, "image"),
    "video_column": (None, "video"),
    "probability": (None, 1, 1.0),
    "timestep_sampling_offset": (None, 0, 0.0),
    "slider_strength": (None,),
    "text_encoder_batch_size": (None, 1),
}

RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
CROP_STYLES = ("center", "centre", "random", "corner")
CROP_STYLES_LATER = ("face",)
CROP_ASPECTS = ("square", "preserve", "closest", "random")
CROP_ASPECTS_LATER: tuple[str, ...] = ()
CAPTION_STRATEGIES = ("filename", "textfile", "instanceprompt", "parquet")
CAPTION_STRATEGIES_LATER = ("huggingface", "webshart", "csv")
METADATA_BACKENDS = ("discovery", "json", "parquet")
METADATA_BACKENDS_LATER = ("huggingface", "webshart")
#: `skip_file_discovery` words SimpleTuner knows (comma or space separated).
SKIP_FILE_DISCOVERY_WORDS = ("vae", "aspect", "metadata", "text")
#: Sub-keys of the `parquet` block (DATALOADER.md "Parquet caption strategy"); the rest are for video,
#: audio or grounding and are recognised only at null.
PARQUET_KEYS_SUPPORTED = frozenset(
    {
        "path",
        "filename_column",
        "caption_column",
        "fallback_caption_column",
        "identifier_includes_extension",
        "width_column",
        "height_column",
    }
)
PARQUET_KEYS_RECOGNISED = frozenset({"bbox_column", "num_frames_column", "fps_column", "aspect_ratio_column"})
BACKEND_TYPES_LATER = ("csv", "huggingface", "webshart", "memory")
DATASET_TYPES_LATER = (
    "video",
    "audio",
    "image_embeds",
    "conditioning_image_embeds",
    "eval",
    "caption",
)

#: config.json keys an image dataset inherits when it does not set them (SimpleTuner `_apply_common_defaults`
#: and `ImageBackendConfig.from_dict`), with SimpleTuner's own defaults.
GLOBAL_DEFAULTS: dict[str, Any] = {
    "resolution": 1024,
    "resolution_type": "pixel_area",
    "crop": False,
    "crop_style": "random",
    "crop_aspect": "square",
    "minimum_image_size": None,
    "maximum_image_size": None,
    "target_downsample_size": None,
    "caption_strategy": "filename",
    "instance_prompt": None,
    "delete_problematic_images": False,
}

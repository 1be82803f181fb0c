"""SimpleTuner options that change nothing about what is trained: accepted at any value, never refused.

A user's unchanged config.json must load. Options that only steer logging, trackers, the Hugging Face Hub,
SimpleTuner's benchmark or UI, or how SimpleTuner spends memory and threads give the same weights whatever
their value, so refusing them would fail a good config for nothing. Each is accepted with its documented
value checked (type and choices, so `report_to: "wandbb"` still gets a suggestion) and, when set away from
SimpleTuner's default, a one-line note saying what stagetune does instead.

Options that *do* change results and are not built stay "not supported yet" (config/train.py).
"""

from __future__ import annotations

_TRACKING = "stagetune reports loss, learning rate and progress as job events and Prometheus metrics"
_HUB = "stagetune's model card and push_to_hub do not use it"
_CACHES = "stagetune's caches are content-addressed in the object store (--store), never per-dataset folders"
_LOADING = "stagetune loads each model once per process and frees it with its job"
_NOT_NEEDED = "stagetune has no such step"

#: option → what stagetune does instead (shown when the option is set away from SimpleTuner's default).
NO_EFFECT: dict[str, str] = {
    # logging and trackers
    "tracker_image_layout": _TRACKING,
    "custom_tracker": _TRACKING,
    "webhook_config": _TRACKING + "; webhooks are not sent",
    "webhook_reporting_interval": _TRACKING + "; webhooks are not sent",
    "print_filenames": "bad files are listed in the ingest report and log, with their reason",
    "print_sampler_statistics": "the ingest report lists every dataset's buckets and counts",
    "debug_aspect_buckets": "the ingest report lists every dataset's buckets and counts",
    "debug_dataset_loader": "the ingest report lists every dataset's buckets and counts",
    # the Hugging Face Hub and model cards
    "push_to_hub_background": "uploads run between training steps",
    "modelspec_comment": _HUB,
    "publishing_config": _HUB,
    "post_upload_script": _HUB + "; the script is not run",
    "post_checkpoint_script": "checkpoints are complete when training_state.json appears; the script is not run",
    # SimpleTuner's benchmark, previews and UI
    "disable_benchmark": "stagetune never samples the base model before training, so there is no benchmark to skip",
    # memory, threads and I/O: how SimpleTuner runs, not what it computes
    "dataloader_prefetch": "batches come from the cache stages' shards",
    "dataloader_prefetch_qlen": "batches come from the cache stages' shards",
    "aspect_bucket_worker_count": "ingest reads image headers only",
    "image_processing_batch_size": "the vae stage decodes images ahead of the encoder by itself",
    "read_batch_size": "the vae stage decodes images ahead of the encoder by itself",
    "max_workers": "the vae stage sets its reader threads from the machine's cores",
    "enable_multiprocessing": "the vae stage sets its reader threads from the machine's cores",
    "metadata_update_interval": "ingest writes its manifest once, atomically",
    "accelerator_cache_clear_interval": _NOT_NEEDED,
    "aws_max_pool_connections": "the S3 client sizes its own connection pool",
    "delete_model_after_load": _LOADING,
    "offload_during_startup": _LOADING,
    "offload_during_save": _LOADING,
    "fully_unload_text_encoder": _LOADING,
    "keep_vae_loaded": _LOADING,
    "set_grads_to_none": "gradients are always freed between steps (the same updates)",
    "compress_disk_cache": _CACHES,
    "cache_dir": _CACHES,
    "cache_dir_text": _CACHES,
    "cache_dir_vae": _CACHES,
    "text_embed_full_cache": _CACHES,
    "preserve_data_backend_cache": _CACHES,
    "override_dataset_config": "multidatabackend.json is always read as written",
    "skip_file_discovery": "an unchanged dataset is never re-read: ingest keeps hashes and sizes by file",
    "vae_cache_scan_behaviour": _CACHES,
    "checkpointing_use_tempdir": "checkpoints are always written atomically",
    "disk_low_threshold": _NOT_NEEDED,
    "disk_low_action": _NOT_NEEDED,
    "disk_low_script": _NOT_NEEDED,
    "local_rank": "set by the launcher, never by config.json",
}

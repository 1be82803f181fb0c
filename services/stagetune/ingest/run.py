"""`run_ingest`: dataset folders in, a content-addressed manifest in the store out.

Reads headers, never pixels: the VAE stage decodes each image once, with the geometry written here.
Every file is hashed, because the hash is what makes the caches shareable and the manifest id stable:
re-ingesting unchanged data gives the same id, and an existing manifest is returned, not rewritten.
Bad files are reported (path and reason) and skipped: one corrupt JPEG in 10,000 must not stop a run,
and it is the user's file, so it is deleted only when the dataset sets `delete_problematic_images`
(SimpleTuner's option); nothing else in the dataset folder is ever touched.

Sampler settings (`probability`, `start_step`, `end_step`, per-dataset `train_batch_size`,
`is_regularisation_data`, `vae_cache_clear_each_epoch`) are not ingest's to apply; it validates them and
records them in `report["datasets"][id]["sampling"]` for the trainer.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stagetune.core.config.dataset import DataBackends, DatasetConfig
from stagetune.core.discovery import limit_samples
from stagetune.core.errors import Collector, ConfigError, InputError
from stagetune.core.manifest import (
    MANIFEST_VERSION,
    ManifestRow,
    canonical_json,
    decode_rows,
    encode_rows,
    hash_bytes,
    load_manifest,
    pixel_key_for,
    report_key,
    sample_id_for,
    samples_key,
)
from stagetune.core.sources import SourceFile, source_for
from stagetune.core.store.base import Store
from stagetune.ingest.buckets import (
    ALIGNMENT,
    BucketPlanner,
    aspect_limit_reason,
    minimum_size_reason,
    repeats_needed,
)
from stagetune.ingest.caption_sources import CaptionTable, caption_filter, load_caption_table
from stagetune.ingest.captions import resolve_captions
from stagetune.ingest.facts import ImageFacts, image_facts
from stagetune.ingest.hashcache import HashCache, iter_hashed

Progress = Callable[[str, int, int], None]


@dataclass
class IngestResult:
    manifest_id: str
    manifest_key: str
    report_key: str
    samples: list[ManifestRow]
    report: dict[str, Any]
    captions: list[str]
    reused: bool = False
    elapsed_s: float = field(default=0.0, compare=False)

    @property
    def num_samples_with_repeats(self) -> int:
        return sum(row.repeats + 1 for row in self.samples)


@dataclass
class _Candidate:
    row: ManifestRow
    relative_path: str


def _check_batch_params(train_batch_size: int, gradient_accumulation_steps: int, world_size: int) -> int:
    for key, value in (
        ("train_batch_size", train_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("world_size", world_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a whole number ≥ 1, got {value!r}", field=key)
    return train_batch_size * world_size * gradient_accumulation_steps


def _caption_table(dataset: DatasetConfig) -> CaptionTable | None:
    if dataset.parquet is None or (
        dataset.caption_strategy != "parquet" and dataset.metadata_backend != "parquet"
    ):
        return None
    try:
        return load_caption_table(dataset.parquet, with_sizes=dataset.metadata_backend == "parquet")
    except (ConfigError, InputError) as exc:
        raise type(exc)(f"dataset {dataset.id!r}: {exc}", field=exc.field) from None


def _table_size_reason(table: CaptionTable, relative_path: str, original: tuple[int, int]) -> str | None:
    """metadata_backend=parquet: the table's size must exist and match the file (else the VAE stage would fail)."""
    entry = table.lookup(relative_path)
    if entry is None:
        tried = " or ".join(repr(i) for i in table.identifiers_for(relative_path))
        return f"no row for {tried} in {table.describe()} (metadata_backend=parquet needs its size)"
    if entry.size is None:
        return f"no usable size in {table.config.path.name} for {entry.identifier!r}: {entry.size_problem}"
    if tuple(entry.size) != tuple(original):
        return (
            f"{table.config.path.name} says {entry.size[0]}x{entry.size[1]} for {entry.identifier!r} but the file "
            f"is {original[0]}x{original[1]} (after EXIF rotation)"
        )
    return None


def _bad(dataset: DatasetConfig, item: SourceFile, entry: dict[str, Any], reason: str) -> dict[str, Any]:
    """A bad-file report entry; deletes the file only when the dataset sets delete_problematic_images."""
    record = {**entry, "reason": reason, "deleted": False}
    if dataset.delete_problematic_images:
        if "://" in item.path:
            record["delete_error"] = "S3 datasets are never modified"
            return record
        try:
            Path(item.path).unlink()
            record["deleted"] = True
        except OSError as exc:
            record["delete_error"] = str(exc.strerror or exc)
    return record


def _why(error: Exception | None) -> str:
    if isinstance(error, OSError):
        return str(error.strerror or error)
    return str(error) if error is not None else "no content hash"



#: Files named per reason in the "no usable image" message; the ingest report lists them all.
_EXAMPLES = 3


def no_usable_image_error(dataset: DatasetConfig, counts: dict[str, Any], bad_files: list[dict[str, Any]],
                          filtered: list[dict[str, Any]], pruned: list[dict[str, Any]]) -> InputError:
    """Why a dataset has nothing to train on, naming files: an empty dataset must stop the run at ingest,
    before any encoder loads, and say what to fix."""
    where = dataset.instance_data_dir or f"s3://{dataset.aws_bucket_name}/{dataset.aws_data_prefix or ''}"
    if not counts["discovered"]:
        return InputError(
            f"dataset {dataset.id!r} has no image files in {where}: add images (.jpg, .png, .webp …) or "
            f"disable the dataset", field=dataset.id)
    parts = []
    for label, entries in (("not usable as images", bad_files), ("filtered out", filtered)):
        mine = [e for e in entries if e.get("dataset_id") == dataset.id]
        if mine:
            shown = "; ".join(f"{e['relative_path']}: {e['reason']}" for e in mine[:_EXAMPLES])
            more = f"; and {len(mine) - _EXAMPLES} more" if len(mine) > _EXAMPLES else ""
            parts.append(f"{len(mine)} {label} ({shown}{more})")
    for entry in (e for e in pruned if e.get("dataset_id") == dataset.id):
        parts.append(entry["message"].removeprefix(f"dataset {dataset.id!r}: "))
    return InputError(
        f"dataset {dataset.id!r} in {where} has no usable image ({counts['discovered']} file(s) found): "
        + "; ".join(parts), field=dataset.id)


def _oversubscribed_repeats(dataset: DatasetConfig, by_bucket: dict[str, list[_Candidate]], effective: int,
                            warnings: list[str]) -> int:
    """SimpleTuner's allow_dataset_oversubscription: the largest `repeats` any short bucket needs, for the
    whole dataset, with a warning saying so."""
    short = [len(members) for members in by_bucket.values() if len(members) * (dataset.repeats + 1) < effective]
    if not short:
        return dataset.repeats
    raised = max(repeats_needed(n, effective) for n in short)
    images = sum(len(members) for members in by_bucket.values())
    warnings.append(
        f"dataset {dataset.id!r}: allow_dataset_oversubscription raised repeats from {dataset.repeats} to {raised}: "
        f"{images} image(s) for an effective batch of {effective}; each image is seen {raised + 1} times per epoch"
    )
    return raised


def run_ingest(
    backends: DataBackends,
    store: Store,
    *,
    train_batch_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    seed: int = 0,
    allow_dataset_oversubscription: bool = False,
    progress: Progress | None = None,
) -> IngestResult:
    """Discover, hash, filter, bucket and caption every enabled dataset; write (or reuse) the manifest.

    A bucket with fewer than `train_batch_size × world_size × gradient_accumulation_steps` samples after
    repeats cannot form one batch on every rank, so it is dropped (as SimpleTuner does) with a message
    giving the `repeats` that would keep it. With `allow_dataset_oversubscription`, a dataset that does not
    set `repeats` itself gets the smallest `repeats` that keeps all its buckets instead (SimpleTuner's rule).
    """
    started = time.monotonic()
    effective_batch = _check_batch_params(train_batch_size, gradient_accumulation_steps, world_size)
    notify = progress or (lambda stage, done, total: None)
    datasets = backends.enabled

    listings: list[tuple[DatasetConfig, Any, list[SourceFile], int]] = []
    for index, dataset in enumerate(datasets):
        source = source_for(dataset)
        try:
            files = source.list_files()
        except InputError as exc:
            raise InputError(f"dataset {dataset.id!r}: {exc}", field="instance_data_dir") from None
        limited = limit_samples(files, dataset.max_num_samples, dataset.id)
        listings.append((dataset, source, limited, len(files)))
        notify("discover", index + 1, len(datasets))
    total_files = sum(len(files) for _, _, files, _ in listings)

    text_embeds = backends.default_text_embeds
    filters = caption_filter(text_embeds.caption_filter_list if text_embeds else ())
    warnings: list[str] = []
    if filters.invalid:
        warnings.append(
            "caption_filter_list entries that are not valid regular expressions are removed as plain text only: "
            + ", ".join(repr(i) for i in filters.invalid)
        )

    planner = BucketPlanner()
    bad_files: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    hash_input: list[dict[str, Any]] = []
    kept: dict[str, list[_Candidate]] = {}
    stats: dict[str, dict[str, Any]] = {}
    done = 0
    for dataset, source, files, discovered in listings:
        listing: list[list[Any]] = []
        # Unchanged files (same size and mtime/ETag) are vouched for by the hash cache, and their size or
        # problem by the facts cache: a re-ingest of an unchanged dataset reads no image.
        hashes = HashCache(store, source.url).load()
        hashes.retain(f.relative for f in files)
        facts = ImageFacts(store, source.url).load()
        candidates: list[_Candidate] = []
        counts: dict[str, Any] = {
            "discovered": discovered,
            "max_num_samples_skipped": discovered - len(files),
            "bad": 0,
            "filtered": 0,
            "pruned": 0,
        }
        table = _caption_table(dataset)
        sizes_from_table = dataset.metadata_backend == "parquet"
        for item, hashed in iter_hashed(source, files, hashes, max_workers=source.read_workers):
            done += 1
            notify("scan", done, total_files)
            entry = {"dataset_id": dataset.id, "path": item.path, "relative_path": item.relative}
            if hashed.error is not None or hashed.digest is None:
                listing.append([item.relative, item.size, None, None])
                bad_files.append(_bad(dataset, item, entry, f"unreadable: {_why(hashed.error)}"))
                counts["bad"] += 1
                continue
            content_hash = hashed.digest
            captions = resolve_captions(
                dataset, item.path, relative_path=item.relative, table=table, filters=filters,
                read_sibling=lambda suffix, path=item.path, src=source: src.read_optional(src.sibling(path, suffix)),
            )
            table_entry = table.lookup(item.relative) if table is not None and sizes_from_table else None
            listing.append(
                [
                    item.relative,
                    item.size,
                    content_hash,
                    hash_bytes(captions.source_bytes),
                    list(table_entry.size) if table_entry and table_entry.size else None,
                ]
            )
            known = facts.get(content_hash)
            if known is None:
                data = hashed.data if hashed.data is not None else source.read(item.path)
                known = image_facts(data, item.path)
                facts.put(content_hash, known)
            if "bad" in known:
                bad_files.append(_bad(dataset, item, entry, known["bad"]))
                counts["bad"] += 1
                continue
            original = (int(known["size"][0]), int(known["size"][1]))
            if captions.problem:
                filtered.append({**entry, "reason": captions.problem})
                counts["filtered"] += 1
                continue
            if table is not None and sizes_from_table:
                reason = _table_size_reason(table, item.relative, original)
                if reason:
                    filtered.append({**entry, "reason": reason})
                    counts["filtered"] += 1
                    continue
            reason = minimum_size_reason(dataset, original)
            if reason:
                filtered.append({**entry, "reason": reason})
                counts["filtered"] += 1
                continue
            geometry = planner.plan(dataset, original, content_hash=content_hash, seed=seed)
            reason = aspect_limit_reason(dataset, geometry.bucket)
            if reason:
                filtered.append({**entry, "reason": reason})
                counts["filtered"] += 1
                continue
            downsample = list(geometry.downsample_size) if geometry.downsample_size else None
            row = ManifestRow(
                sample_id=sample_id_for(dataset.id, item.relative),
                dataset_id=dataset.id,
                path=item.path,
                content_hash=content_hash,
                captions=list(captions.captions),
                original_size=list(original),
                downsample_size=downsample,
                intermediary_size=list(geometry.intermediary_size),
                crop_box=list(geometry.crop_box),
                target_size=list(geometry.target_size),
                bucket=geometry.bucket,
                repeats=dataset.repeats,
                is_regularisation_data=dataset.is_regularisation_data,
                pixel_key=pixel_key_for(
                    content_hash,
                    geometry.downsample_size,
                    geometry.intermediary_size,
                    geometry.crop_box,
                    geometry.target_size,
                ),
            )
            candidates.append(_Candidate(row=row, relative_path=item.relative))
        facts.save()
        hash_input.append({"options": dataset.ingest_options(), "listing": listing})
        kept[dataset.id] = candidates
        stats[dataset.id] = counts
        counts["sampling"] = dataset.sampling(train_batch_size)
        counts["crop_style"] = dataset.crop_style if dataset.crop else None  # epoch crops (trainer/epochs.py)
        counts["effective_batch_size"] = (dataset.train_batch_size or train_batch_size) * (
            world_size * gradient_accumulation_steps
        )
        fallbacks = planner.upscale_fallbacks.get(dataset.id, 0)
        if fallbacks:
            counts["upscale_fallbacks"] = fallbacks
            warnings.append(
                f"dataset {dataset.id!r}: {fallbacks} image(s) fit no crop_aspect_buckets entry within "
                f"max_upscale_threshold {dataset.max_upscale_threshold:g} and were given the square bucket "
                f"(as SimpleTuner: \"Using square crop.\")"
            )
        if dataset.max_upscale_threshold is not None and dataset.crop and (
            dataset.crop_aspect == "closest"
            or (dataset.crop_aspect == "random" and dataset.crop_aspect_buckets[0][1] is not None)
        ):
            warnings.append(
                f"dataset {dataset.id!r}: max_upscale_threshold has no effect with crop_aspect="
                f"{dataset.crop_aspect}{' and weighted buckets' if dataset.crop_aspect == 'random' else ''}; "
                f"SimpleTuner applies it only to crop_aspect=random with a plain list of aspects"
            )

    manifest_id = hash_bytes(
        canonical_json(
            {
                "version": MANIFEST_VERSION,
                "alignment": ALIGNMENT,
                "datasets": hash_input,
                "batch": {
                    "train_batch_size": train_batch_size,
                    "gradient_accumulation_steps": gradient_accumulation_steps,
                    "world_size": world_size,
                },
                "seed": seed,
                "caption_filter_list": list(filters.items),
                "allow_dataset_oversubscription": allow_dataset_oversubscription,
            }
        )
    )
    rows_key, rep_key = samples_key(manifest_id), report_key(manifest_id)

    if store.exists(rep_key):
        samples = decode_rows(store.get_bytes(rows_key))
        report = json.loads(store.get_bytes(rep_key))
        return IngestResult(
            manifest_id=manifest_id,
            manifest_key=rows_key,
            report_key=rep_key,
            samples=samples,
            report=report,
            captions=sorted({c for row in samples for c in row.captions}),
            reused=True,
            elapsed_s=time.monotonic() - started,
        )

    samples: list[ManifestRow] = []
    pruned: list[dict[str, Any]] = []
    bucket_counts: dict[str, dict[str, dict[str, int]]] = {}
    for dataset in datasets:
        by_bucket: dict[str, list[_Candidate]] = defaultdict(list)
        for candidate in kept[dataset.id]:
            by_bucket[candidate.row.bucket].append(candidate)
        counts = stats[dataset.id]
        per_bucket: dict[str, dict[str, int]] = {}
        survivors: list[_Candidate] = []
        dataset_batch = dataset.train_batch_size or train_batch_size
        dataset_effective = counts["effective_batch_size"]
        repeats = dataset.repeats
        if allow_dataset_oversubscription and not dataset.repeats_set:
            repeats = _oversubscribed_repeats(dataset, by_bucket, dataset_effective, warnings)
            if repeats != dataset.repeats:
                counts["repeats"] = repeats
                for members in by_bucket.values():
                    for candidate in members:
                        candidate.row = replace(candidate.row, repeats=repeats)
        for bucket in sorted(by_bucket, key=float):
            members = by_bucket[bucket]
            with_repeats = len(members) * (repeats + 1)
            if with_repeats < dataset_effective:
                needed = repeats_needed(len(members), dataset_effective)
                message = (
                    f"dataset {dataset.id!r}: bucket {bucket} dropped: {len(members)} image(s) × "
                    f"{repeats + 1} (repeats={repeats}) = {with_repeats} sample(s) < "
                    f"{dataset_effective} (train_batch_size {dataset_batch} × GPUs {world_size} × "
                    f"gradient_accumulation_steps {gradient_accumulation_steps}); "
                    f"repeats ≥ {needed} would keep it"
                    + ("" if allow_dataset_oversubscription else " (or allow_dataset_oversubscription, when the "
                       "dataset does not set repeats)")
                )
                pruned.append(
                    {
                        "dataset_id": dataset.id,
                        "bucket": bucket,
                        "images": len(members),
                        "repeats": repeats,
                        "samples_with_repeats": with_repeats,
                        "effective_batch_size": dataset_effective,
                        "repeats_needed": needed,
                        "paths": [c.row.path for c in members],
                        "message": message,
                    }
                )
                counts["pruned"] += len(members)
                continue
            per_bucket[bucket] = {"images": len(members), "samples_with_repeats": with_repeats}
            survivors.extend(members)
        survivors.sort(key=lambda c: c.relative_path)
        samples.extend(c.row for c in survivors)
        counts["samples"] = len(survivors)
        counts["samples_with_repeats"] = len(survivors) * (repeats + 1)
        bucket_counts[dataset.id] = per_bucket

    problems = Collector()
    for dataset in datasets:
        if not stats[dataset.id]["samples"]:
            problems.add(no_usable_image_error(dataset, stats[dataset.id], bad_files, filtered, pruned))
    problems.raise_if_any()

    totals: dict[str, int] = defaultdict(int)
    for per_bucket in bucket_counts.values():
        for bucket, numbers in per_bucket.items():
            totals[bucket] += numbers["samples_with_repeats"]
    captions = sorted({c for row in samples for c in row.captions})
    report: dict[str, Any] = {
        "manifest_id": manifest_id,
        "version": MANIFEST_VERSION,
        "effective_batch_size": effective_batch,
        "train_batch_size": train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "world_size": world_size,
        "seed": seed,
        "num_samples": len(samples),
        "num_samples_with_repeats": sum(row.repeats + 1 for row in samples),
        "num_captions": len(captions),
        "datasets": stats,
        "buckets": bucket_counts,
        "bucket_totals": {k: totals[k] for k in sorted(totals, key=float)},
        "bad_files": bad_files,
        "filtered": filtered,
        "pruned_buckets": pruned,
        "warnings": warnings,
    }
    store.put_bytes(rows_key, encode_rows(samples))
    store.put_bytes(rep_key, json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return IngestResult(
        manifest_id=manifest_id,
        manifest_key=rows_key,
        report_key=rep_key,
        samples=samples,
        report=report,
        captions=captions,
        reused=False,
        elapsed_s=time.monotonic() - started,
    )


__all__ = ["IngestResult", "load_manifest", "run_ingest"]

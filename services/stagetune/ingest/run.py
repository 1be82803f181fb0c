"""`run_ingest`: dataset folders in, a content-addressed manifest in the store out.

Reads headers, never pixels: the VAE stage decodes each image once, with the geometry written here.
Every file is hashed, because the hash is what makes the caches shareable and the manifest id stable:
re-ingesting unchanged data gives the same id, and an existing manifest is returned, not rewritten.
Bad files are reported (path and reason) and skipped: one corrupt JPEG in 10,000 must not stop a run,
and it is the user's file, so it is never deleted.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stagetune.core.config.dataset import DataBackends, DatasetConfig
from stagetune.core.errors import ConfigError, InputError
from stagetune.core.imaging import check_complete, read_image_size
from stagetune.core.store.base import Store
from stagetune.ingest.buckets import (
    ALIGNMENT,
    BucketPlanner,
    aspect_limit_reason,
    minimum_size_reason,
    repeats_needed,
)
from stagetune.ingest.captions import resolve_captions
from stagetune.ingest.discovery import DiscoveredFile, discover_images
from stagetune.ingest.manifest import (
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


def run_ingest(
    backends: DataBackends,
    store: Store,
    *,
    train_batch_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    seed: int = 0,
    progress: Progress | None = None,
) -> IngestResult:
    """Discover, hash, filter, bucket and caption every enabled dataset; write (or reuse) the manifest.

    A bucket with fewer than `train_batch_size × world_size × gradient_accumulation_steps` samples after
    repeats cannot form one batch on every rank, so it is dropped (as SimpleTuner does) with a message
    giving the `repeats` that would keep it.
    """
    started = time.monotonic()
    effective_batch = _check_batch_params(train_batch_size, gradient_accumulation_steps, world_size)
    notify = progress or (lambda stage, done, total: None)
    datasets = backends.enabled

    listings: list[tuple[DatasetConfig, list[DiscoveredFile]]] = []
    for index, dataset in enumerate(datasets):
        try:
            files = discover_images(dataset.instance_data_dir)
        except InputError as exc:
            raise InputError(f"dataset {dataset.id!r}: {exc}", field="instance_data_dir") from None
        listings.append((dataset, files))
        notify("discover", index + 1, len(datasets))
    total_files = sum(len(files) for _, files in listings)

    planner = BucketPlanner()
    bad_files: list[dict[str, Any]] = []
    filtered: list[dict[str, Any]] = []
    hash_input: list[dict[str, Any]] = []
    kept: dict[str, list[_Candidate]] = {}
    stats: dict[str, dict[str, Any]] = {}
    done = 0
    for dataset, files in listings:
        listing: list[list[Any]] = []
        candidates: list[_Candidate] = []
        counts = {"discovered": len(files), "bad": 0, "filtered": 0, "pruned": 0}
        for item in files:
            done += 1
            notify("scan", done, total_files)
            entry = {"dataset_id": dataset.id, "path": str(item.path), "relative_path": item.relative_path}
            try:
                data = item.path.read_bytes()
            except OSError as exc:
                listing.append([item.relative_path, item.size, None, None])
                bad_files.append({**entry, "reason": f"unreadable: {exc.strerror or exc}"})
                counts["bad"] += 1
                continue
            content_hash = hash_bytes(data)
            captions = resolve_captions(dataset, item.path)
            listing.append([item.relative_path, len(data), content_hash, hash_bytes(captions.source_bytes)])
            try:
                if not data:
                    raise InputError(f"{item.path}: empty file (0 bytes)", field=str(item.path))
                check_complete(data, name=str(item.path))
                original = read_image_size(data, name=str(item.path))
            except InputError as exc:
                bad_files.append({**entry, "reason": str(exc)})
                counts["bad"] += 1
                continue
            if captions.problem:
                filtered.append({**entry, "reason": captions.problem})
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
                sample_id=sample_id_for(dataset.id, item.relative_path),
                dataset_id=dataset.id,
                path=str(item.path),
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
            candidates.append(_Candidate(row=row, relative_path=item.relative_path))
        hash_input.append({"options": dataset.ingest_options(), "listing": listing})
        kept[dataset.id] = candidates
        stats[dataset.id] = counts

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
        for bucket in sorted(by_bucket, key=float):
            members = by_bucket[bucket]
            with_repeats = len(members) * (dataset.repeats + 1)
            if with_repeats < effective_batch:
                needed = repeats_needed(len(members), effective_batch)
                message = (
                    f"dataset {dataset.id!r}: bucket {bucket} dropped: {len(members)} image(s) × "
                    f"{dataset.repeats + 1} (repeats={dataset.repeats}) = {with_repeats} sample(s) < "
                    f"{effective_batch} (train_batch_size {train_batch_size} × GPUs {world_size} × "
                    f"gradient_accumulation_steps {gradient_accumulation_steps}); "
                    f"repeats ≥ {needed} would keep it"
                )
                pruned.append(
                    {
                        "dataset_id": dataset.id,
                        "bucket": bucket,
                        "images": len(members),
                        "repeats": dataset.repeats,
                        "samples_with_repeats": with_repeats,
                        "effective_batch_size": effective_batch,
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
        counts["samples_with_repeats"] = len(survivors) * (dataset.repeats + 1)
        bucket_counts[dataset.id] = per_bucket

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
        "warnings": [] if samples else ["no sample left after filtering and pruning: nothing to train on"],
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

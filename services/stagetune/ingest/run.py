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
from stagetune.ingest.masks import MaskIndex

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


@dataclass
class _Findings:
    """What the scan reports beside the rows: files it could not use, and why."""

    bad_files: list[dict[str, Any]] = field(default_factory=list)
    filtered: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class _DatasetScan:
    """One dataset after scanning: its rows, counts, and what of it the manifest id covers."""

    dataset: DatasetConfig
    counts: dict[str, Any]
    listing: list[list[Any]] = field(default_factory=list)
    candidates: list[_Candidate] = field(default_factory=list)
    masks: MaskIndex | None = None

    def skip(self, into: list[dict[str, Any]], entry: dict[str, Any], key: str) -> None:
        into.append(entry)
        self.counts[key] += 1

    def hash_input(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"options": self.dataset.ingest_options(), "listing": self.listing}
        if self.masks is not None:  # absent without masks, so unmasked manifest ids are unchanged
            entry["masks"] = {"dataset": self.masks.dataset.ingest_options(), "listing": self.masks.listing()}
        return entry


class _Scanner:
    """Reads every file's hash, captions and header once, and turns the usable ones into manifest rows."""

    def __init__(self, store: Store, *, seed: int, filters: Any, notify: Progress, total_files: int) -> None:
        self.store = store
        self.seed = seed
        self.filters = filters
        self.notify = notify
        self.total_files = total_files
        self.done = 0
        self.planner = BucketPlanner()
        self.findings = _Findings()

    def scan(self, dataset: DatasetConfig, source: Any, files: list[SourceFile], discovered: int,
             masks: MaskIndex | None) -> _DatasetScan:
        # Unchanged files (same size and mtime/ETag) are vouched for by the hash cache, and their size or
        # problem by the facts cache: a re-ingest of an unchanged dataset reads no image.
        hashes = HashCache(self.store, source.url).load()
        hashes.retain(f.relative for f in files)
        facts = ImageFacts(self.store, source.url).load()
        counts = {"discovered": discovered, "max_num_samples_skipped": discovered - len(files), "bad": 0,
                  "filtered": 0, "pruned": 0}
        scan = _DatasetScan(dataset, counts, masks=masks)
        table = _caption_table(dataset)
        for item, hashed in iter_hashed(source, files, hashes, max_workers=source.read_workers):
            self.done += 1
            self.notify("scan", self.done, self.total_files)
            self._file(scan, source, facts, table, item, hashed)
        facts.save()
        if masks is not None:
            masks.save()
        return scan

    def _file(self, scan: _DatasetScan, source: Any, facts: ImageFacts, table: CaptionTable | None,
              item: SourceFile, hashed: Any) -> None:
        dataset, findings = scan.dataset, self.findings
        entry = {"dataset_id": dataset.id, "path": item.path, "relative_path": item.relative}
        if hashed.error is not None or hashed.digest is None:
            scan.listing.append([item.relative, item.size, None, None])
            findings.bad_files.append(_bad(dataset, item, entry, f"unreadable: {_why(hashed.error)}"))
            scan.counts["bad"] += 1
            return
        content_hash = hashed.digest
        captions = resolve_captions(
            dataset, item.path, relative_path=item.relative, table=table, filters=self.filters,
            read_sibling=lambda suffix, path=item.path, src=source: src.read_optional(src.sibling(path, suffix)),
        )
        sizes_from_table = table is not None and dataset.metadata_backend == "parquet"
        table_entry = table.lookup(item.relative) if sizes_from_table else None
        scan.listing.append([item.relative, item.size, content_hash, hash_bytes(captions.source_bytes),
                             list(table_entry.size) if table_entry and table_entry.size else None])
        known = facts.get(content_hash)
        if known is None:
            known = image_facts(hashed.data if hashed.data is not None else source.read(item.path), item.path)
            facts.put(content_hash, known)
        if "bad" in known:
            findings.bad_files.append(_bad(dataset, item, entry, known["bad"]))
            scan.counts["bad"] += 1
            return
        original = (int(known["size"][0]), int(known["size"][1]))
        mask, reason = scan.masks.mask_for(item.relative, original) if scan.masks is not None else (None, None)
        reason = reason or captions.problem
        if reason is None and sizes_from_table:
            reason = _table_size_reason(table, item.relative, original)
        reason = reason or minimum_size_reason(dataset, original)
        geometry = None
        if reason is None:
            geometry = self.planner.plan(dataset, original, content_hash=content_hash, seed=self.seed)
            reason = aspect_limit_reason(dataset, geometry.bucket)
        if reason is not None or geometry is None:
            scan.skip(findings.filtered, {**entry, "reason": reason}, "filtered")
            return
        row = _row(dataset, item, content_hash, list(captions.captions), original, geometry, mask)
        scan.candidates.append(_Candidate(row=row, relative_path=item.relative))

    def dataset_notes(self, scan: _DatasetScan, train_batch_size: int, world_size: int,
                      gradient_accumulation_steps: int) -> None:
        """The dataset's sampler settings for the trainer, and warnings about options that did nothing."""
        dataset, counts, warnings = scan.dataset, scan.counts, self.findings.warnings
        counts["sampling"] = dataset.sampling(train_batch_size)
        counts["crop_style"] = dataset.crop_style if dataset.crop else None  # epoch crops (trainer/epochs.py)
        counts["effective_batch_size"] = (dataset.train_batch_size or train_batch_size) * (
            world_size * gradient_accumulation_steps
        )
        fallbacks = self.planner.upscale_fallbacks.get(dataset.id, 0)
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


def _row(dataset: DatasetConfig, item: SourceFile, content_hash: str, captions: list[str],
         original: tuple[int, int], geometry: Any, mask: dict[str, str] | None) -> ManifestRow:
    return ManifestRow(
        sample_id=sample_id_for(dataset.id, item.relative),
        dataset_id=dataset.id,
        path=item.path,
        content_hash=content_hash,
        captions=captions,
        original_size=list(original),
        downsample_size=list(geometry.downsample_size) if geometry.downsample_size else None,
        intermediary_size=list(geometry.intermediary_size),
        crop_box=list(geometry.crop_box),
        target_size=list(geometry.target_size),
        bucket=geometry.bucket,
        repeats=dataset.repeats,
        is_regularisation_data=dataset.is_regularisation_data,
        pixel_key=pixel_key_for(content_hash, geometry.downsample_size, geometry.intermediary_size,
                                geometry.crop_box, geometry.target_size),
        mask=mask,
    )


def _list_datasets(datasets: list[DatasetConfig], notify: Progress
                   ) -> list[tuple[DatasetConfig, Any, list[SourceFile], int]]:
    listings = []
    for index, dataset in enumerate(datasets):
        source = source_for(dataset)
        try:
            files = source.list_files()
        except InputError as exc:
            raise InputError(f"dataset {dataset.id!r}: {exc}", field="instance_data_dir") from None
        listings.append((dataset, source, limit_samples(files, dataset.max_num_samples, dataset.id), len(files)))
        notify("discover", index + 1, len(datasets))
    return listings


def _caption_filters(backends: DataBackends, warnings: list[str]) -> Any:
    text_embeds = backends.default_text_embeds
    filters = caption_filter(text_embeds.caption_filter_list if text_embeds else ())
    if filters.invalid:
        warnings.append(
            "caption_filter_list entries that are not valid regular expressions are removed as plain text only: "
            + ", ".join(repr(i) for i in filters.invalid)
        )
    return filters


@dataclass
class _Batching:
    train_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    allow_dataset_oversubscription: bool


def _keep_full_buckets(scan: _DatasetScan, batching: _Batching, warnings: list[str], pruned: list[dict[str, Any]]
                       ) -> tuple[list[ManifestRow], dict[str, dict[str, int]]]:
    """The dataset's rows in buckets that can form a batch on every rank; the others dropped with the
    `repeats` that would keep them (SimpleTuner's rule), or repeats raised (allow_dataset_oversubscription)."""
    dataset, counts = scan.dataset, scan.counts
    by_bucket: dict[str, list[_Candidate]] = defaultdict(list)
    for candidate in scan.candidates:
        by_bucket[candidate.row.bucket].append(candidate)
    effective = counts["effective_batch_size"]
    repeats = dataset.repeats
    if batching.allow_dataset_oversubscription and not dataset.repeats_set:
        repeats = _oversubscribed_repeats(dataset, by_bucket, effective, warnings)
        if repeats != dataset.repeats:
            counts["repeats"] = repeats
            for candidate in scan.candidates:
                candidate.row = replace(candidate.row, repeats=repeats)
    per_bucket: dict[str, dict[str, int]] = {}
    survivors: list[_Candidate] = []
    for bucket in sorted(by_bucket, key=float):
        members = by_bucket[bucket]
        with_repeats = len(members) * (repeats + 1)
        if with_repeats < effective:
            pruned.append(_pruned_bucket(dataset, bucket, members, repeats, effective, batching))
            counts["pruned"] += len(members)
            continue
        per_bucket[bucket] = {"images": len(members), "samples_with_repeats": with_repeats}
        survivors.extend(members)
    survivors.sort(key=lambda c: c.relative_path)
    counts["samples"] = len(survivors)
    counts["samples_with_repeats"] = len(survivors) * (repeats + 1)
    return [c.row for c in survivors], per_bucket


def _pruned_bucket(dataset: DatasetConfig, bucket: str, members: list[_Candidate], repeats: int, effective: int,
                   batching: _Batching) -> dict[str, Any]:
    with_repeats = len(members) * (repeats + 1)
    needed = repeats_needed(len(members), effective)
    message = (
        f"dataset {dataset.id!r}: bucket {bucket} dropped: {len(members)} image(s) × "
        f"{repeats + 1} (repeats={repeats}) = {with_repeats} sample(s) < "
        f"{effective} (train_batch_size {dataset.train_batch_size or batching.train_batch_size} × GPUs "
        f"{batching.world_size} × gradient_accumulation_steps {batching.gradient_accumulation_steps}); "
        f"repeats ≥ {needed} would keep it"
        + ("" if batching.allow_dataset_oversubscription else " (or allow_dataset_oversubscription, when the "
           "dataset does not set repeats)")
    )
    return {"dataset_id": dataset.id, "bucket": bucket, "images": len(members), "repeats": repeats,
            "samples_with_repeats": with_repeats, "effective_batch_size": effective, "repeats_needed": needed,
            "paths": [c.row.path for c in members], "message": message}


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
    batching = _Batching(train_batch_size, gradient_accumulation_steps, world_size, allow_dataset_oversubscription)
    notify = progress or (lambda stage, done, total: None)
    datasets = backends.enabled
    listings = _list_datasets(datasets, notify)
    warnings: list[str] = []
    filters = _caption_filters(backends, warnings)
    scanner = _Scanner(store, seed=seed, filters=filters, notify=notify,
                       total_files=sum(len(files) for _, _, files, _ in listings))
    scanner.findings.warnings = warnings
    scans: list[_DatasetScan] = []
    for dataset, source, files, discovered in listings:
        mask_dataset = backends.mask_for(dataset)
        scan = scanner.scan(dataset, source, files, discovered,
                            MaskIndex(mask_dataset, store) if mask_dataset is not None else None)
        scanner.dataset_notes(scan, train_batch_size, world_size, gradient_accumulation_steps)
        scans.append(scan)

    manifest_id = hash_bytes(canonical_json({
        "version": MANIFEST_VERSION,
        "alignment": ALIGNMENT,
        "datasets": [scan.hash_input() for scan in scans],
        "batch": {"train_batch_size": train_batch_size, "gradient_accumulation_steps": gradient_accumulation_steps,
                  "world_size": world_size},
        "seed": seed,
        "caption_filter_list": list(filters.items),
        "allow_dataset_oversubscription": allow_dataset_oversubscription,
    }))
    rows_key, rep_key = samples_key(manifest_id), report_key(manifest_id)
    if store.exists(rep_key):
        samples = decode_rows(store.get_bytes(rows_key))
        return IngestResult(manifest_id=manifest_id, manifest_key=rows_key, report_key=rep_key, samples=samples,
                            report=json.loads(store.get_bytes(rep_key)),
                            captions=sorted({c for row in samples for c in row.captions}), reused=True,
                            elapsed_s=time.monotonic() - started)

    samples: list[ManifestRow] = []
    pruned: list[dict[str, Any]] = []
    bucket_counts: dict[str, dict[str, dict[str, int]]] = {}
    for scan in scans:
        rows, bucket_counts[scan.dataset.id] = _keep_full_buckets(scan, batching, warnings, pruned)
        samples.extend(rows)
    findings = scanner.findings
    problems = Collector()
    for scan in scans:
        if not scan.counts["samples"]:
            problems.add(no_usable_image_error(scan.dataset, scan.counts, findings.bad_files, findings.filtered,
                                               pruned))
    problems.raise_if_any()

    report = _report(manifest_id, batching, effective_batch, seed, samples, {s.dataset.id: s.counts for s in scans},
                     bucket_counts, findings, pruned)
    store.put_bytes(rows_key, encode_rows(samples))
    store.put_bytes(rep_key, json.dumps(report, indent=1, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return IngestResult(manifest_id=manifest_id, manifest_key=rows_key, report_key=rep_key, samples=samples,
                        report=report, captions=sorted({c for row in samples for c in row.captions}), reused=False,
                        elapsed_s=time.monotonic() - started)


def _report(manifest_id: str, batching: _Batching, effective_batch: int, seed: int, samples: list[ManifestRow],
            stats: dict[str, dict[str, Any]], bucket_counts: dict[str, dict[str, dict[str, int]]],
            findings: _Findings, pruned: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, int] = defaultdict(int)
    for per_bucket in bucket_counts.values():
        for bucket, numbers in per_bucket.items():
            totals[bucket] += numbers["samples_with_repeats"]
    captions = sorted({c for row in samples for c in row.captions})
    return {
        "manifest_id": manifest_id,
        "version": MANIFEST_VERSION,
        "effective_batch_size": effective_batch,
        "train_batch_size": batching.train_batch_size,
        "gradient_accumulation_steps": batching.gradient_accumulation_steps,
        "world_size": batching.world_size,
        "seed": seed,
        "num_samples": len(samples),
        "num_samples_with_repeats": sum(row.repeats + 1 for row in samples),
        "num_captions": len(captions),
        "datasets": stats,
        "buckets": bucket_counts,
        "bucket_totals": {k: totals[k] for k in sorted(totals, key=float)},
        "bad_files": findings.bad_files,
        "filtered": findings.filtered,
        "pruned_buckets": pruned,
        "warnings": findings.warnings,
    }


__all__ = ["IngestResult", "load_manifest", "run_ingest"]

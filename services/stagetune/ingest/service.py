"""IngestService: a thin gRPC layer over `stagetune.ingest.run.run_ingest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stagetune.core import checks, requests
from stagetune.core.errors import Collector
from stagetune.core.grpc_server import ServiceBinding, job_service
from stagetune.core.jobs import JobContext
from stagetune.core.run_settings import data_settings
from stagetune.core.store.base import Store
from stagetune.v1 import ingest_pb2, ingest_pb2_grpc

SERVICE = "ingest"


def ingest_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.config.dataset import load_data_backend_config
    from stagetune.ingest.run import run_ingest

    req: ingest_pb2.StartIngestRequest = ctx.request
    backends = load_data_backend_config(
        json.loads(req.data_backend_config_json),
        defaults=json.loads(req.dataset_defaults_json or "{}"),
        base_dir=Path(req.base_dir) if req.base_dir else None,
    )
    result = run_ingest(
        backends,
        ctx.store,
        train_batch_size=req.train_batch_size or 1,
        gradient_accumulation_steps=req.gradient_accumulation_steps or 1,
        world_size=req.world_size or 1,
        seed=req.seed,
        allow_dataset_oversubscription=req.allow_dataset_oversubscription,
        progress=lambda phase, done, total: ctx.progress(phase, done, total, "files"),
    )
    report = result.report
    for line in _report_lines(report):
        ctx.log(line, "warning")
    data = data_settings(result.samples)  # the trainer's and the CLI's "is this the same data?"
    return {
        "data_digest": data["digest"],
        "data_samples": str(data["samples"]),
        "manifest_id": result.manifest_id,
        "samples": str(len(result.samples)),
        "captions": str(len(result.captions)),
        "reused": str(result.reused).lower(),
        # The text_embeds entry's write_batch_size (SimpleTuner reads it there) for the text stage.
        "text_write_batch_size": str(getattr(backends.default_text_embeds, "write_batch_size", None) or ""),
    }


def _report_lines(report: Any) -> list[str]:
    data = report if isinstance(report, dict) else getattr(report, "__dict__", {})
    lines = []
    for bad in data.get("bad_files", []):
        path, reason = str(bad.get("path")), str(bad.get("reason"))
        lines.append(f"skipped {path}: {reason.removeprefix(path + ': ')}")
    for pruned in data.get("pruned_buckets", []):
        lines.append(str(pruned.get("message", pruned)))
    lines.extend(str(w) for w in data.get("warnings", []))
    return lines


def validate(req: ingest_pb2.StartIngestRequest) -> None:
    """Start's checks: the dataset config parses, its folders exist, the counts make sense."""
    from stagetune.core.config.dataset import load_data_backend_config

    problems = Collector()
    requests.non_negative(problems, req, "train_batch_size", "gradient_accumulation_steps", "world_size")
    entries = requests.json_list(problems, req.data_backend_config_json, "data_backend_config_json")
    defaults = requests.json_object(problems, req.dataset_defaults_json, "dataset_defaults_json")
    base = requests.base_dir(problems, req.base_dir)
    if entries is not None and defaults is not None:
        with problems.check():
            backends = load_data_backend_config(entries, defaults=defaults, base_dir=base)
            for dataset in backends.read:
                if dataset.instance_data_dir is not None:
                    with problems.check():
                        checks.check_dataset_folder(dataset.id, dataset.instance_data_dir)
    problems.raise_if_any("StartIngestRequest")


def binding(store: Store) -> ServiceBinding:
    return job_service(store, name=SERVICE, servicer_base=ingest_pb2_grpc.IngestServiceServicer,
                       add_to_server=ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                       request_type=ingest_pb2.StartIngestRequest, work=ingest_job, validate=validate)

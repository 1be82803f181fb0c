"""IngestService: a thin gRPC layer over `stagetune.ingest.run.run_ingest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from stagetune.core.grpc_server import JobServicer, ServiceBinding, job_to_proto
from stagetune.core.jobs import JobContext, JobManager
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

SERVICE = "ingest"


def ingest_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.config.dataset import load_data_backend_config
    from stagetune.ingest.run import run_ingest

    spec = ctx.spec
    backends = load_data_backend_config(
        json.loads(spec["data_backend_config_json"]),
        defaults=json.loads(spec.get("dataset_defaults_json") or "{}"),
        base_dir=Path(spec["base_dir"]) if spec.get("base_dir") else None,
    )
    result = run_ingest(
        backends,
        ctx.store,
        train_batch_size=spec.get("train_batch_size") or 1,
        gradient_accumulation_steps=spec.get("gradient_accumulation_steps") or 1,
        world_size=spec.get("world_size") or 1,
        seed=spec.get("seed", 0),
        progress=lambda phase, done, total: ctx.progress(phase, done, total, "files"),
    )
    report = result.report
    for line in _report_lines(report):
        ctx.log(line, "warning")
    return {
        "manifest_id": result.manifest_id,
        "samples": str(len(result.samples)),
        "captions": str(len(result.captions)),
        "reused": str(result.reused).lower(),
    }


def _report_lines(report: Any) -> list[str]:
    data = report if isinstance(report, dict) else getattr(report, "__dict__", {})
    lines = []
    for bad in data.get("bad_files", []):
        path, reason = str(bad.get("path")), str(bad.get("reason"))
        lines.append(f"skipped {path}: {reason.removeprefix(path + ': ')}")
    for pruned in data.get("pruned_buckets", []):
        lines.append(str(pruned.get("message", pruned)))
    return lines


class IngestServicer(JobServicer, ingest_pb2_grpc.IngestServiceServicer):
    def Start(self, request: ingest_pb2.StartIngestRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        spec = {
            "data_backend_config_json": request.data_backend_config_json,
            "dataset_defaults_json": request.dataset_defaults_json,
            "base_dir": request.base_dir,
            "train_batch_size": request.train_batch_size,
            "gradient_accumulation_steps": request.gradient_accumulation_steps,
            "world_size": request.world_size,
            "seed": request.seed,
        }
        return job_to_proto(self.manager.submit(request.request_id, spec))


def binding(store: Store) -> ServiceBinding:
    manager = JobManager(SERVICE, store, ingest_job)
    return ServiceBinding(
        "stagetune.v1.IngestService",
        ingest_pb2_grpc.add_IngestServiceServicer_to_server,
        IngestServicer(manager),
        manager,
    )

"""TextService: encodes every caption of a manifest (plus extras and "") into the embedding cache."""

from __future__ import annotations

import json

import grpc
import torch

from stagetune.core.cache import ShardedCache
from stagetune.core.encode import chunks, encode_missing
from stagetune.core.grpc_server import JobServicer, ServiceBinding, job_to_proto
from stagetune.core.jobs import JobContext, JobManager
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2, text_pb2, text_pb2_grpc

SERVICE = "text"


def text_cache_prefix(fingerprint: str) -> str:
    return f"cache/text/{fingerprint}"


def text_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.ingest.run import load_manifest
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.families import get_family

    spec = ctx.spec
    captions: set[str] = {""}  # the empty caption serves caption dropout and unconditional guidance
    if spec.get("manifest_id"):
        for row in load_manifest(ctx.store, spec["manifest_id"]):
            captions.update(row.captions)
    captions.update(spec.get("extra_captions") or [])
    ordered = sorted(captions)
    family = get_family(spec.get("model_family") or "sd3")
    ctx.progress("fingerprinting text encoders", 0, 1)
    encoder = family.text_encoder(spec["model"], revision=spec.get("revision") or None,
                                  dtype=parse_dtype(spec.get("dtype")))
    options = {"t5_max_length": spec.get("max_sequence_length") or 154,
               "t5_padding": spec.get("t5_padding") or "unmodified"}
    prefix = text_cache_prefix(encoder.fingerprint)
    cache = ShardedCache(ctx.store, prefix)

    def key_of(caption: str) -> str:
        return encoder.cache_key(caption, **options)

    def encode(batch: list[str]) -> list[dict[str, torch.Tensor]]:
        out = encoder.encode(batch, **options)
        return [{name: tensor[i].contiguous() for name, tensor in out.items()} for i in range(len(batch))]

    stats = encode_missing(
        stage=SERVICE, items=ordered, key_of=key_of, cache=cache,
        batches=lambda todo: chunks(todo, spec.get("batch_size") or 8), encode=encode,
        write_batch_size=spec.get("write_batch_size") or 128,
        progress=lambda done, total: ctx.progress("encoding captions", done, total, "captions"),
        load=lambda: encoder.models,
    )
    keys_key = f"jobs/{ctx.job_id}/text_keys.json"
    ctx.store.put_bytes(keys_key, json.dumps({c: key_of(c) for c in ordered}, sort_keys=True).encode())
    ctx.log(f"text embeddings: {stats.encoded} encoded, {stats.hits} cache hits of {stats.total}")
    return {"cache_prefix": prefix, "keys": keys_key, "fingerprint": encoder.fingerprint, **stats.as_outputs()}


class TextServicer(JobServicer, text_pb2_grpc.TextServiceServicer):
    def Start(self, request: text_pb2.StartEncodeTextRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        spec = {
            "manifest_id": request.manifest_id,
            "extra_captions": list(request.extra_captions),
            "model": request.model.name_or_path,
            "model_family": request.model.family,
            "revision": request.model.revision,
            "dtype": request.model.dtype,
            "max_sequence_length": request.max_sequence_length,
            "t5_padding": request.t5_padding,
            "batch_size": request.batch_size,
            "write_batch_size": request.write_batch_size,
        }
        return job_to_proto(self.manager.submit(request.request_id, spec))


def binding(store: Store) -> ServiceBinding:
    manager = JobManager(SERVICE, store, text_job)
    return ServiceBinding("stagetune.v1.TextService", text_pb2_grpc.add_TextServiceServicer_to_server,
                          TextServicer(manager), manager)

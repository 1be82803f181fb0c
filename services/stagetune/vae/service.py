"""VaeService: encodes a manifest's images into the latent cache (`cache/vae/<fingerprint>/`)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

import grpc
import torch
import xxhash

from stagetune.core.cache import ShardedCache
from stagetune.core.encode import chunks, encode_missing
from stagetune.core.grpc_server import JobServicer, ServiceBinding, job_to_proto
from stagetune.core.jobs import JobContext, JobManager
from stagetune.core.store.base import Store
from stagetune.ingest.manifest import ManifestRow
from stagetune.v1 import common_pb2, vae_pb2, vae_pb2_grpc

SERVICE = "vae"


def latent_cache_prefix(fingerprint: str) -> str:
    return f"cache/vae/{fingerprint}"


def vae_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.imaging import load_image_rgb, prepare_pixels
    from stagetune.ingest.run import load_manifest
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.families import get_family

    spec = ctx.spec
    rows = load_manifest(ctx.store, spec["manifest_id"])
    family = get_family(spec.get("model_family") or "sd3")
    ctx.progress("fingerprinting vae", 0, 1)
    encoder = family.latent_encoder(spec["model"], revision=spec.get("revision") or None,
                                    dtype=parse_dtype(spec.get("dtype")))
    prefix = latent_cache_prefix(encoder.fingerprint)
    cache = ShardedCache(ctx.store, prefix)

    def batches(todo: list[ManifestRow]) -> Iterable[list[ManifestRow]]:
        by_size: dict[tuple[int, int], list[ManifestRow]] = defaultdict(list)  # a batch needs one pixel size
        for row in todo:
            by_size[tuple(row.target_size)].append(row)
        for size in sorted(by_size):
            yield from chunks(by_size[size], spec.get("vae_batch_size") or 4)

    def encode(batch: list[ManifestRow]) -> list[dict[str, torch.Tensor]]:
        pixels = torch.stack([prepare_pixels(load_image_rgb(row.path), row) for row in batch])
        seeds = [int(row.pixel_key[:15], 16) for row in batch]
        latents = encoder.encode(pixels, seeds)
        return [{"latents": latent.contiguous()} for latent in latents]

    stats = encode_missing(
        stage=SERVICE, items=rows, key_of=lambda row: encoder.latent_key(row.pixel_key), cache=cache,
        batches=batches, encode=encode, write_batch_size=spec.get("write_batch_size") or 128,
        load=lambda: encoder.vae,
        progress=lambda done, total: ctx.progress("encoding latents", done, total, "images"),
    )
    keys = {row.sample_id: encoder.latent_key(row.pixel_key) for row in rows}
    keys_key = f"jobs/{ctx.job_id}/latent_keys.json"
    ctx.store.put_bytes(keys_key, json.dumps(keys, sort_keys=True).encode())
    ctx.log(f"latents: {stats.encoded} encoded, {stats.hits} cache hits of {stats.total}")
    return {"cache_prefix": prefix, "keys": keys_key, "fingerprint": encoder.fingerprint,
            "keys_digest": xxhash.xxh3_64_hexdigest(json.dumps(keys, sort_keys=True).encode()), **stats.as_outputs()}


class VaeServicer(JobServicer, vae_pb2_grpc.VaeServiceServicer):
    def Start(self, request: vae_pb2.StartEncodeLatentsRequest, context: grpc.ServicerContext) -> common_pb2.Job:
        spec = {
            "manifest_id": request.manifest_id,
            "model": request.model.name_or_path,
            "model_family": request.model.family,
            "revision": request.model.revision,
            "dtype": request.model.dtype,
            "vae_batch_size": request.vae_batch_size,
            "write_batch_size": request.write_batch_size,
        }
        return job_to_proto(self.manager.submit(request.request_id, spec))


def binding(store: Store) -> ServiceBinding:
    manager = JobManager(SERVICE, store, vae_job)
    return ServiceBinding("stagetune.v1.VaeService", vae_pb2_grpc.add_VaeServiceServicer_to_server,
                          VaeServicer(manager), manager)

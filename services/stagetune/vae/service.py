"""VaeService: encodes a manifest's images into the latent cache (`cache/vae/<fingerprint>/`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import xxhash

from stagetune.core import requests
from stagetune.core.cache import ShardedCache
from stagetune.core.encode import PROCESS_THREADS, encode_missing, helper_threads
from stagetune.core.errors import Collector
from stagetune.core.grpc_server import ServiceBinding, job_service
from stagetune.core.jobs import JobContext
from stagetune.core.latents import DatasetImages, batch_masks, batch_pixels, batches_by_size, encode_rows
from stagetune.core.manifest import ManifestRow
from stagetune.core.ondemand import cached_only
from stagetune.core.store.base import Store
from stagetune.v1 import vae_pb2, vae_pb2_grpc

SERVICE = "vae"
#: Threads reading and decoding the next batches' images while the VAE encodes this one. On a CPU the VAE
#: gets the remaining cores (`encoder_threads`): readers and torch threads fighting over the same cores
#: slowed encoding several times on a 2-core machine (benchmarks/README.md).
READ_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))


def encoder_threads(device: object) -> int:
    """On a CPU the decoding threads need cores of their own: the VAE gets the rest, a fixed number per
    machine (a count chosen by timing would make latents depend on timing; see `compute_threads`)."""
    if getattr(device, "type", "cpu") != "cpu":
        return PROCESS_THREADS
    return max(1, PROCESS_THREADS - READ_WORKERS)


def latent_cache_prefix(fingerprint: str) -> str:
    return f"cache/vae/{fingerprint}"


def vae_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.manifest import load_manifest
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.family import get_family

    req: vae_pb2.StartEncodeLatentsRequest = ctx.request
    rows = load_manifest(ctx.store, req.manifest_id)
    family = get_family(req.model.family or "sd3")
    ctx.progress("fingerprinting vae", 0, 1)
    encoder = family.latent_encoder(req.model.name_or_path, revision=req.model.revision or None,
                                    dtype=parse_dtype(req.model.dtype))
    prefix = latent_cache_prefix(encoder.fingerprint)
    cache = ShardedCache(ctx.store, prefix)

    def key_of(row: ManifestRow) -> str:
        return encoder.latent_key(row.entry_key)

    if req.keys_only:  # vae_cache_ondemand / vae_cache_disable: the trainer encodes what is missing
        stats = cached_only(stage=SERVICE, items=rows, key_of=key_of, cache=cache)
    else:
        images = DatasetImages(req.data_backend_config_json)
        with helper_threads(READ_WORKERS, "vae-read") as pool:
            stats = encode_missing(
                stage=SERVICE, items=rows, key_of=key_of, cache=cache,
                batches=lambda todo: batches_by_size(todo, req.vae_batch_size or 4),
                prepare=lambda batch: (batch_pixels(batch, images, pool), batch_masks(batch, images.mask, pool)),
                encode=lambda batch, read: encode_rows(encoder, batch, pixels=read[0], masks=read[1]),
                write_batch_size=req.write_batch_size or 128, load=lambda: encoder.vae,
                torch_threads=encoder_threads(encoder.device),
                progress=lambda done, total: ctx.progress("encoding latents", done, total, "images"),
            )
    keys = {row.sample_id: encoder.latent_key(row.entry_key) for row in rows}
    keys_key = f"jobs/{ctx.job_id}/latent_keys.json"
    ctx.store.put_bytes(keys_key, json.dumps(keys, sort_keys=True).encode())
    ctx.log(f"latents: {stats.encoded} encoded, {stats.hits} cache hits of {stats.total}"
            + (f", {stats.total - stats.hits} left to encode during training" if req.keys_only else ""))
    return {"cache_prefix": prefix, "keys": keys_key, "fingerprint": encoder.fingerprint,
            "keys_digest": xxhash.xxh3_64_hexdigest(json.dumps(keys, sort_keys=True).encode()), **stats.as_outputs()}


def validator(store: Store) -> Callable[[vae_pb2.StartEncodeLatentsRequest], None]:
    def validate(req: vae_pb2.StartEncodeLatentsRequest) -> None:
        problems = Collector()
        requests.non_negative(problems, req, "vae_batch_size", "write_batch_size")
        requests.manifest(problems, store, req.manifest_id)
        requests.model_ref(problems, req.model)
        requests.base_dir(problems, req.base_dir)
        if req.data_backend_config_json:
            requests.json_list(problems, req.data_backend_config_json, "data_backend_config_json")
        problems.raise_if_any("StartEncodeLatentsRequest")

    return validate


def binding(store: Store) -> ServiceBinding:
    return job_service(store, name=SERVICE, servicer_base=vae_pb2_grpc.VaeServiceServicer,
                       add_to_server=vae_pb2_grpc.add_VaeServiceServicer_to_server,
                       request_type=vae_pb2.StartEncodeLatentsRequest, work=vae_job, validate=validator(store))

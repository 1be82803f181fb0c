"""TextService: encodes every caption of a manifest (plus extras and "") into the embedding cache."""

from __future__ import annotations

import json
from collections.abc import Callable

from stagetune.core import requests
from stagetune.core.cache import ShardedCache
from stagetune.core.embeddings import encode_captions, tokenize_captions
from stagetune.core.encode import chunks, encode_missing
from stagetune.core.errors import Collector
from stagetune.core.grpc_server import ServiceBinding, job_service
from stagetune.core.jobs import JobContext
from stagetune.core.messages import from_struct
from stagetune.core.ondemand import cached_only
from stagetune.core.store.base import Store
from stagetune.v1 import text_pb2, text_pb2_grpc

SERVICE = "text"


def text_cache_prefix(fingerprint: str) -> str:
    return f"cache/text/{fingerprint}"


def text_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.manifest import load_manifest
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.family import get_family

    req: text_pb2.StartEncodeTextRequest = ctx.request
    captions: set[str] = {""}  # the empty caption serves caption dropout and unconditional guidance
    if req.manifest_id:
        for row in load_manifest(ctx.store, req.manifest_id):
            captions.update(row.captions)
    captions.update(req.extra_captions)
    ordered = sorted(captions)
    family = get_family(req.model.family or "sd3")
    ctx.progress("fingerprinting text encoders", 0, 1)
    encoder = family.text_encoder(req.model.name_or_path, revision=req.model.revision or None,
                                  dtype=parse_dtype(req.model.dtype), quantisation=dict(req.model.quantisation))
    options = family.text_options(from_struct(req.family_options))
    prefix = text_cache_prefix(encoder.fingerprint)
    cache = ShardedCache(ctx.store, prefix)

    def key_of(caption: str) -> str:
        return encoder.cache_key(caption, **options)

    if req.keys_only:  # text_cache_ondemand / text_cache_disable: the trainer encodes what is missing
        stats = cached_only(stage=SERVICE, items=ordered, key_of=key_of, cache=cache)
    else:
        stats = encode_missing(
            stage=SERVICE, items=ordered, key_of=key_of, cache=cache,
            batches=lambda todo: chunks(todo, req.batch_size or 8),
            prepare=lambda batch: tokenize_captions(encoder, batch, options),
            encode=lambda batch, tokens: encode_captions(encoder, batch, options, tokens),
            write_batch_size=req.write_batch_size or 128,
            progress=lambda done, total: ctx.progress("encoding captions", done, total, "captions"),
            load=lambda: encoder.warm(**options),
        )
    keys_key = f"jobs/{ctx.job_id}/text_keys.json"
    ctx.store.put_bytes(keys_key, json.dumps({c: key_of(c) for c in ordered}, sort_keys=True).encode())
    ctx.log(f"text embeddings: {stats.encoded} encoded, {stats.hits} cache hits of {stats.total}")
    return {"cache_prefix": prefix, "keys": keys_key, "fingerprint": encoder.fingerprint, **stats.as_outputs()}


def validator(store: Store) -> Callable[[text_pb2.StartEncodeTextRequest], None]:
    def validate(req: text_pb2.StartEncodeTextRequest) -> None:
        problems = Collector()
        requests.non_negative(problems, req, "batch_size", "write_batch_size")
        requests.manifest(problems, store, req.manifest_id, required=not req.extra_captions)
        requests.model_ref(problems, req.model)
        requests.family_options(problems, req.model.family, from_struct(req.family_options))
        problems.raise_if_any("StartEncodeTextRequest")

    return validate


def binding(store: Store) -> ServiceBinding:
    return job_service(store, name=SERVICE, servicer_base=text_pb2_grpc.TextServiceServicer,
                       add_to_server=text_pb2_grpc.add_TextServiceServicer_to_server,
                       request_type=text_pb2.StartEncodeTextRequest, work=text_job, validate=validator(store))

"""ValidationService: samples prompts from a model plus a checkpoint's adapter, stores the images,
and streams small previews as job events."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from stagetune.core import requests
from stagetune.core.errors import Collector, InputError
from stagetune.core.grpc_server import ServiceBinding, job_service
from stagetune.core.jobs import JobContext
from stagetune.core.messages import from_struct
from stagetune.core.store.base import Store
from stagetune.v1 import validation_pb2, validation_pb2_grpc
from stagetune.validation.sampling import png_bytes

SERVICE = "validation"
PREVIEW_EDGE = 256
MAX_EDGE = 8192


def image_name(step: int, name: str, width: int, height: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "prompt"
    return f"step_{step}_{safe}_{width}x{height}.png"


def validation_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.outputs import open_output
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.family import get_family
    from stagetune.models.loading import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # diffusers and peft: one importing thread at a time (models/warmup.py)
        from stagetune.validation.sampling import Sampling, adapter, get_pipeline, sample

    req: validation_pb2.StartValidationRequest = ctx.request
    family = get_family(req.model.family or "sd3")
    options = Sampling.from_proto(req.sampling, family)
    prompts = [(p.name, p.prompt) for p in req.prompts]
    total = len(prompts) * len(options.resolutions)
    ctx.progress("loading pipeline", 0, total, "images")
    pipe = get_pipeline(family, req.model.name_or_path, req.model.revision or None, parse_dtype(req.model.dtype),
                        dict(req.model.quantisation))
    output = open_output(req.output_prefix) if req.output_prefix else None
    written = 0
    files: list[str] = []
    previews = Previews(ctx, family, req, output) if req.sampling.preview_steps > 0 else None
    with adapter(pipe, ctx.store, req.adapter_key):
        for name, prompt in prompts:
            for width, height in options.resolutions:
                ctx.check_cancelled()
                hook = previews.hook(name, width, height) if previews is not None else None
                image = sample(pipe, prompt, width, height, options, on_latents=hook,
                               every=req.sampling.preview_steps)
                file = image_name(req.step, name, width, height)
                if output is not None:
                    output.put_bytes(file, png_bytes(image))
                    files.append(file)
                ctx.preview(name, png_bytes(image, PREVIEW_EDGE), req.step, file)
                written += 1
                ctx.progress("sampling", written, total, "images")
    return {"images": str(written), "output": output.url if output is not None else "",
            "files": json.dumps(files)}


class Previews:
    """SimpleTuner's validation_preview: the latents every `preview_steps` sampling steps, decoded by the
    family's tiny preview decoder, streamed as Preview events and saved under validation_images/previews/."""

    def __init__(self, ctx: JobContext, family: Any, req: validation_pb2.StartValidationRequest,
                 output: Any) -> None:
        self.ctx, self.family, self.req, self.output = ctx, family, req, output
        self._decoder: Any = None

    def hook(self, name: str, width: int, height: int) -> Callable[[int, Any], None]:
        def on_latents(step: int, latents: Any) -> None:
            if self._decoder is None:
                self._decoder = self.family.preview_decoder(self.req.model.name_or_path,
                                                            revision=self.req.model.revision or None)
            image = self.family.preview_image(self._decoder, latents, max_edge=PREVIEW_EDGE)
            base = image_name(self.req.step, name, width, height).removesuffix(".png")
            file = f"previews/{base}_sample_{step}.png"
            if self.output is not None:
                self.output.put_bytes(file, png_bytes(image))
            self.ctx.preview(f"{name} (sampling step {step})", png_bytes(image, PREVIEW_EDGE), self.req.step, file)

        return on_latents


def validator(store: Store) -> Callable[[validation_pb2.StartValidationRequest], None]:
    def validate(req: validation_pb2.StartValidationRequest) -> None:
        problems = Collector()
        requests.model_ref(problems, req.model)
        if not req.prompts:
            problems.add(InputError("prompts is empty: give at least one prompt to sample", field="prompts"))
        for index, prompt in enumerate(req.prompts):
            if not prompt.prompt.strip():
                problems.add(InputError(f"prompts[{index}].prompt is empty", field=f"prompts[{index}].prompt"))
        if req.adapter_key:
            requests.store_objects(problems, store, [("adapter_key", req.adapter_key)])
        sampling = req.sampling
        requests.non_negative(problems, sampling, "num_inference_steps", prefix="sampling.")
        requests.finite(problems, sampling, "guidance_scale", prefix="sampling.")
        for index, size in enumerate(sampling.resolutions):
            if not (0 < size.width <= MAX_EDGE and 0 < size.height <= MAX_EDGE):
                problems.add(InputError(f"sampling.resolutions[{index}] must be 1-{MAX_EDGE} pixels each way, got "
                                        f"{size.width}x{size.height}", field=f"sampling.resolutions[{index}]"))
        requests.family_options(problems, req.model.family, from_struct(sampling.family_options),
                                field="sampling.family_options")
        problems.raise_if_any("StartValidationRequest")

    return validate


def binding(store: Store) -> ServiceBinding:
    return job_service(store, name=SERVICE, servicer_base=validation_pb2_grpc.ValidationServiceServicer,
                       add_to_server=validation_pb2_grpc.add_ValidationServiceServicer_to_server,
                       request_type=validation_pb2.StartValidationRequest, work=validation_job,
                       validate=validator(store))

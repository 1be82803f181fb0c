"""ValidationService: samples prompts from a model plus a checkpoint's adapter, stores the images,
and streams small previews as job events."""

from __future__ import annotations

import re

import grpc

from stagetune.core.grpc_server import JobServicer, ServiceBinding, job_to_proto
from stagetune.core.jobs import JobContext, JobManager
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2, validation_pb2, validation_pb2_grpc

SERVICE = "validation"
PREVIEW_EDGE = 256


def image_name(step: int, name: str, width: int, height: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "prompt"
    return f"step_{step}_{safe}_{width}x{height}.png"


def validation_job(ctx: JobContext) -> dict[str, str]:
    from stagetune.core.outputs import open_output
    from stagetune.models.dtypes import parse_dtype
    from stagetune.models.families import get_family
    from stagetune.validation.sampling import Sampling, adapter, get_pipeline, png_bytes, sample

    spec = ctx.spec
    family = get_family(spec.get("model_family") or "sd3")
    options = Sampling(**spec["sampling"])
    prompts = spec["prompts"]
    total = len(prompts) * len(options.resolutions)
    ctx.progress("loading pipeline", 0, total, "images")
    pipe = get_pipeline(family, spec["model"], spec.get("revision") or None, parse_dtype(spec.get("dtype")))
    output = open_output(spec["output_prefix"]) if spec.get("output_prefix") else None
    written = 0
    with adapter(pipe, ctx.store, spec.get("adapter_key", "")):
        for name, prompt in prompts:
            for width, height in options.resolutions:
                ctx.check_cancelled()
                image = sample(pipe, prompt, width, height, options)
                file = image_name(spec.get("step", 0), name, width, height)
                if output is not None:
                    output.put_bytes(file, png_bytes(image))
                ctx.preview(name, png_bytes(image, PREVIEW_EDGE), spec.get("step", 0), file)
                written += 1
                ctx.progress("sampling", written, total, "images")
    return {"images": str(written), "output": output.url if output is not None else ""}


class ValidationServicer(JobServicer, validation_pb2_grpc.ValidationServiceServicer):
    def Start(self, request: validation_pb2.StartValidationRequest, context: grpc.ServicerContext
              ) -> common_pb2.Job:
        s = request.sampling
        spec = {
            "model_family": request.model.family,
            "model": request.model.name_or_path,
            "revision": request.model.revision,
            "dtype": request.model.dtype,
            "adapter_key": request.adapter_key,
            "step": request.step,
            "prompts": [(p.name, p.prompt) for p in request.prompts],
            "output_prefix": request.output_prefix,
            "sampling": {
                "guidance_scale": s.guidance_scale,
                "num_inference_steps": s.num_inference_steps or 20,
                "seed": s.seed,
                "negative_prompt": s.negative_prompt,
                "resolutions": [(r.width, r.height) for r in s.resolutions] or [(1024, 1024)],
                "skip_guidance_layers": list(s.skip_guidance_layers),
                "skip_layer_guidance_scale": s.skip_layer_guidance_scale,
                "skip_layer_guidance_start": s.skip_layer_guidance_start,
                "skip_layer_guidance_stop": s.skip_layer_guidance_stop,
            },
        }
        return job_to_proto(self.manager.submit(request.request_id, spec))


def binding(store: Store) -> ServiceBinding:
    manager = JobManager(SERVICE, store, validation_job)
    return ServiceBinding("stagetune.v1.ValidationService",
                          validation_pb2_grpc.add_ValidationServiceServicer_to_server,
                          ValidationServicer(manager), manager)

"""The trainer's side of validation: hand a snapshot to the validation service and move on."""

from __future__ import annotations

from typing import Any

from stagetune.core.client import call, follow
from stagetune.core.security import ChannelSecurity
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2, validation_pb2, validation_pb2_grpc


def validation_request(cfg: Any, *, request_id: str, adapter_key: str, step: int, output_prefix: str
                       ) -> validation_pb2.StartValidationRequest:
    prompts = [validation_pb2.ValidationPrompt(name="validation", prompt=cfg.validation_prompt)]
    for name, prompt in (cfg.user_prompts or {}).items():
        prompts.append(validation_pb2.ValidationPrompt(name=name, prompt=prompt))
    sampling = validation_pb2.SamplingOptions(
        guidance_scale=cfg.validation_guidance,
        num_inference_steps=cfg.validation_num_inference_steps,
        seed=cfg.validation_seed if cfg.validation_seed is not None else (cfg.seed or 0),
        negative_prompt=cfg.validation_negative_prompt or "",
        resolutions=[validation_pb2.Resolution(width=w, height=h) for w, h in cfg.validation_resolution],
        skip_guidance_layers=list(cfg.validation_guidance_skip_layers or []),
        skip_layer_guidance_scale=cfg.validation_guidance_skip_scale,
        skip_layer_guidance_start=cfg.validation_guidance_skip_layers_start,
        skip_layer_guidance_stop=cfg.validation_guidance_skip_layers_stop,
    )
    model = common_pb2.ModelRef(name_or_path=cfg.pretrained_model_name_or_path, revision=cfg.revision or "",
                                family=cfg.model_family, dtype="bfloat16" if cfg.mixed_precision == "bf16" else "")
    return validation_pb2.StartValidationRequest(
        request_id=request_id, model=model, adapter_key=adapter_key, step=step, prompts=prompts,
        sampling=sampling, output_prefix=output_prefix,
    )


class ValidationRequester:
    """Starts one validation job per snapshot; `wait` collects them at the end of training."""

    def __init__(self, endpoint: str, store: Store, job_id: str, cfg: Any, *, output_dir: Store) -> None:
        self.channel = ChannelSecurity.from_env().channel(endpoint)  # the cluster's token and TLS, if any
        self.stub = validation_pb2_grpc.ValidationServiceStub(self.channel)
        self.store = store
        self.job_id = job_id
        self.cfg = cfg
        self.output_prefix = f"{output_dir.url.rstrip('/')}/validation_images"
        self.pending: list[common_pb2.Job] = []

    def request(self, step: int, lora: bytes) -> None:
        adapter_key = f"jobs/{self.job_id}/adapters/step-{step}/pytorch_lora_weights.safetensors"
        self.store.put_bytes(adapter_key, lora)
        request = validation_request(self.cfg, request_id=f"{self.job_id}-step-{step}", adapter_key=adapter_key,
                                     step=step, output_prefix=self.output_prefix)
        self.pending.append(call(self.stub.Start, request))

    def wait(self) -> int:
        images = 0
        for job in self.pending:
            images += int(follow(self.stub, job).outputs.get("images", 0))
        self.channel.close()
        return images

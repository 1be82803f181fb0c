"""The trainer's side of validation: hand a snapshot to the validation service and move on."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from stagetune.core.client import TERMINAL, call, follow
from stagetune.core.errors import StagetuneError
from stagetune.core.jobs import JobCancelled
from stagetune.core.messages import to_struct
from stagetune.core.outputs import join_output
from stagetune.core.security import ChannelSecurity
from stagetune.core.store.base import Store
from stagetune.v1 import common_pb2, validation_pb2, validation_pb2_grpc


def validation_prompts(cfg: Any) -> list[tuple[str, str]]:
    """(name, prompt): `validation_prompt` when set, then the user prompt library's. As in SimpleTuner, a
    library alone is enough to validate (seed 003 sets only `user_prompt_library`)."""
    prompts = [("validation", cfg.validation_prompt)] if cfg.validation_prompt else []
    return prompts + list((cfg.user_prompts or {}).items())


def validation_request(cfg: Any, *, request_id: str, adapter_key: str, step: int, output_prefix: str
                       ) -> validation_pb2.StartValidationRequest:
    prompts = [validation_pb2.ValidationPrompt(name=name, prompt=prompt) for name, prompt in validation_prompts(cfg)]
    sampling = validation_pb2.SamplingOptions(
        guidance_scale=cfg.validation_guidance,
        num_inference_steps=cfg.validation_num_inference_steps,
        seed=cfg.validation_seed if cfg.validation_seed is not None else (cfg.seed or 0),
        negative_prompt=cfg.validation_negative_prompt or "",
        resolutions=[validation_pb2.Resolution(width=w, height=h) for w, h in cfg.validation_resolution],
        family_options=to_struct(cfg.family_options),
        preview_steps=cfg.validation_preview_steps if cfg.validation_preview else 0,
    )
    model = common_pb2.ModelRef(name_or_path=cfg.pretrained_model_name_or_path, revision=cfg.revision or "",
                                family=cfg.model_family, dtype="bfloat16" if cfg.mixed_precision == "bf16" else "",
                                quantisation=cfg.text_encoder_quantisation())
    return validation_pb2.StartValidationRequest(
        request_id=request_id, model=model, adapter_key=adapter_key, step=step, prompts=prompts,
        sampling=sampling, output_prefix=output_prefix,
    )


def _image_label(file_name: str, step: int) -> str:
    """`step_12_validation_64x64.png` → `validation_64x64`: the step is the tracker's axis, not the name."""
    return file_name.removeprefix(f"step_{step}_").removesuffix(".png")


class ValidationRequester:
    """Starts one validation job per snapshot; `wait` collects them at the end of training."""

    def __init__(self, endpoint: str, store: Store, job_id: str, cfg: Any, *, output_dir: str) -> None:
        self.channel = ChannelSecurity.from_env().channel(endpoint)  # the cluster's token and TLS, if any
        self.stub = validation_pb2_grpc.ValidationServiceStub(self.channel)
        self.store = store
        self.job_id = job_id
        self.cfg = cfg
        self.output_prefix = join_output(output_dir, "validation_images")
        self.pending: list[common_pb2.Job] = []
        self._steps: dict[str, int] = {}  # job id → training step it samples
        self._collected: set[str] = set()

    def request(self, step: int, lora: bytes, variant: str = "") -> None:
        """Sample `lora` at `step`; `variant` ("ema") names a second set of images of the same step."""
        tag = f"step-{step}" + (f"-{variant}" if variant else "")
        adapter_key = f"jobs/{self.job_id}/adapters/{tag}/pytorch_lora_weights.safetensors"
        self.store.put_bytes(adapter_key, lora)
        request = validation_request(self.cfg, request_id=f"{self.job_id}-{tag}", adapter_key=adapter_key,
                                     step=step, output_prefix=self.output_prefix)
        if variant:
            for prompt in request.prompts:
                prompt.name = f"{prompt.name}_{variant}"
        job = call(self.stub.Start, request)
        self.pending.append(job)
        self._steps[job.job_id] = step

    def collect_images(self) -> list[tuple[int, dict[str, bytes]]]:
        """(step, {image name: PNG}) of each validation job that succeeded since the last call; never waits.
        For report_to's trackers: the images reach them as soon as they exist, not at the end."""
        from stagetune.core.outputs import open_output

        found = []
        for job in self.pending:
            if job.job_id in self._collected:
                continue
            with contextlib.suppress(StagetuneError):
                current = call(self.stub.Get, common_pb2.GetJobRequest(job_id=job.job_id))
                if current.state not in TERMINAL:
                    continue
                self._collected.add(job.job_id)
                if current.state != common_pb2.JOB_STATE_SUCCEEDED:
                    continue  # `wait` reports the failure
                files = json.loads(current.outputs.get("files") or "[]")
                output = open_output(self.output_prefix)
                step = self._steps[job.job_id]
                found.append((step, {_image_label(name, step): output.get_bytes(name) for name in files}))
        return found

    def wait(self, cancelled: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> int:
        """Images written by every requested job; when the trainer is cancelled meanwhile, the pending
        validation jobs are cancelled too and `JobCancelled` is raised (Ctrl-C does not wait for sampling)."""
        images = 0
        for job in self.pending:
            while True:
                current = call(self.stub.Get, common_pb2.GetJobRequest(job_id=job.job_id))
                if current.state in TERMINAL:
                    images += int(follow(self.stub, current).outputs.get("images", 0))
                    break
                if cancelled():
                    for other in self.pending:
                        with contextlib.suppress(StagetuneError):
                            call(self.stub.Cancel, common_pb2.CancelJobRequest(job_id=other.job_id))
                    raise JobCancelled("validation")
                time.sleep(poll_s)
        return images

    def close(self) -> None:
        self.channel.close()

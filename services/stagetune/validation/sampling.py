"""Sampling images from a base model plus an optional LoRA adapter.

The pipeline is loaded once per (family, model, revision, dtype) and kept; adapters are loaded
per request from the store and unloaded afterwards, so one validation server serves every
checkpoint of every job on that base model.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stagetune.core.messages import from_struct
from stagetune.core.store.base import Store
from stagetune.models.loading import MODEL_LOAD_LOCK
from stagetune.models.quantise import quantise

_pipelines: dict[tuple, Any] = {}
_lock = threading.Lock()


@dataclasses.dataclass
class Sampling:
    guidance_scale: float = 3.0
    num_inference_steps: int = 20
    seed: int = 0
    negative_prompt: str = ""
    resolutions: list[tuple[int, int]] = dataclasses.field(default_factory=lambda: [(1024, 1024)])
    #: Pipeline arguments the model family adds (ModelFamily.sampling_kwargs, e.g. SD3's skip-layer guidance).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_proto(cls, options: Any, family: Any) -> Sampling:
        """From `SamplingOptions`; unset fields keep the defaults above."""
        return cls(
            guidance_scale=options.guidance_scale,
            num_inference_steps=options.num_inference_steps or cls.num_inference_steps,
            seed=options.seed,
            negative_prompt=options.negative_prompt,
            resolutions=[(r.width, r.height) for r in options.resolutions] or [(1024, 1024)],
            extra=family.sampling_kwargs(from_struct(options.family_options)),
        )


def get_pipeline(family: Any, name_or_path: str, revision: str | None, dtype: torch.dtype,
                 quantisation: Mapping[str, str] | None = None) -> Any:
    """The family's pipeline, loaded once per model; text encoders quantised as training encoded captions
    (`text_encoder_N_precision`), so validation prompts get the embeddings training saw."""
    quantisation = dict(sorted((quantisation or {}).items()))
    key = (family.name, name_or_path, revision, dtype, tuple(quantisation.items()))
    with _lock:
        if key not in _pipelines:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with MODEL_LOAD_LOCK:
                pipe = family.pipeline_class().from_pretrained(name_or_path, revision=revision, dtype=dtype)
                for name, precision in quantisation.items():
                    quantise(getattr(pipe, family.text_encoder_components[name]), precision, exclude=(),
                             key=f"{name}_precision")
            pipe.set_progress_bar_config(disable=True)
            _pipelines[key] = pipe.to(device)
        return _pipelines[key]


@contextmanager
def adapter(pipe: Any, store: Store, adapter_key: str) -> Iterator[None]:
    """What the trainer sent, on the pipeline for the duration of the block: a LoRA (with its rank/alpha
    metadata, through load_lora_weights), a LyCORIS export (diffusers' load_lora_adapter reads its module
    names), or a whole transformer (model_type full: its weights swapped in, the base's put back after)."""
    if not adapter_key:
        yield
        return
    from safetensors import safe_open
    from safetensors.torch import load as load_safetensors

    data = store.get_bytes(adapter_key)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "pytorch_lora_weights.safetensors"
        local.write_bytes(data)
        with safe_open(str(local), framework="pt") as handle:
            metadata, keys = handle.metadata() or {}, list(handle.keys())
        if metadata.get("stagetune_adapter") == "lycoris":
            pipe.transformer.load_lora_adapter(load_safetensors(data), prefix=None, adapter_name="validation")
            undo = lambda: pipe.transformer.delete_adapters("validation")  # noqa: E731
        elif keys and all("lora" in key for key in keys):
            pipe.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name="validation")
            undo = lambda: pipe.delete_adapters("validation")  # noqa: E731
        else:
            undo = _swap_weights(pipe.transformer, load_safetensors(data))
    try:
        yield
    finally:
        undo()


def _swap_weights(transformer: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Copy trained weights into the shared pipeline's transformer; the returned function puts the base back.

    Found by module path, through any adapter wrapper an earlier request left (peft keeps `base_layer`)."""
    def parameter(key: str) -> torch.Tensor:
        path, _, leaf = key.rpartition(".")
        module = transformer.get_submodule(path) if path else transformer
        module = getattr(module, "base_layer", module)
        return getattr(module, leaf)

    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = parameter(key)
            saved[key] = target.detach().clone()
            target.copy_(tensor.to(target.dtype))

    def undo() -> None:
        with torch.no_grad():
            for key, tensor in saved.items():
                parameter(key).copy_(tensor)

    return undo


def sample(pipe: Any, prompt: str, width: int, height: int, options: Sampling,
           on_latents: Callable[[int, torch.Tensor], None] | None = None, every: int = 1) -> Image.Image:
    """One image; `on_latents(step, latents)` sees the latents after every `every`-th step (previews)."""
    device = pipe.device if hasattr(pipe, "device") else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(options.seed)
    kwargs = dict(options.extra)
    if on_latents is not None:
        def step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if (step + 1) % max(1, every) == 0:
                on_latents(step + 1, tensors["latents"])
            return tensors

        kwargs.update(callback_on_step_end=step_end, callback_on_step_end_tensor_inputs=["latents"])
    with torch.inference_mode():
        result = pipe(
            prompt=prompt,
            negative_prompt=options.negative_prompt or None,
            width=width,
            height=height,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            generator=generator,
            **kwargs,
        )
    return result.images[0]


def png_bytes(image: Image.Image, max_edge: int | None = None) -> bytes:
    if max_edge and max(image.size) > max_edge:
        image = image.copy()
        image.thumbnail((max_edge, max_edge))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

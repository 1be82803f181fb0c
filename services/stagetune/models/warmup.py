"""Import the heavy model libraries in the background while ingest runs.

A fresh process spends seconds importing diffusers' and transformers' model classes; the encoder
stages would pay that only when they first load a model. Starting the imports at once overlaps them
with ingest and server start-up (Python's import lock makes the later real import wait, not repeat).
"""

from __future__ import annotations

import importlib
import logging
import threading

log = logging.getLogger(__name__)

MODULES = {
    "sd3": (
        "diffusers.models.autoencoders.autoencoder_kl",
        "diffusers.models.transformers.transformer_sd3",
        "transformers.models.clip.modeling_clip",
        "transformers.models.t5.modeling_t5",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
    ),
}


def _import_all(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the real import later reports the error properly
            log.debug("background import of %s failed: %s", name, exc)


def warm_imports(family: str = "sd3") -> threading.Thread:
    thread = threading.Thread(target=_import_all, args=(MODULES.get(family, ()),), name="warm-imports", daemon=True)
    thread.start()
    return thread

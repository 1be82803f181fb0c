"""Import the heavy model libraries in the background while ingest runs.

A fresh process spends seconds importing diffusers' and transformers' model classes; the encoder
stages would pay that only when they first load a model. Starting the imports at once overlaps them
with ingest and server start-up. The imports run under the model load lock, which every loader takes
before its own `from diffusers import …`: the libraries' lazy modules are not safe to import from two
threads at once ("cannot import name 'AutoencoderKL' from 'diffusers'"), so a loader waits for the
warm-up instead of racing it.
"""

from __future__ import annotations

import importlib
import logging
import threading

from stagetune.models.loading import MODEL_LOAD_LOCK

log = logging.getLogger(__name__)

MODULES = {
    "sd3": (
        "diffusers.models.autoencoders.autoencoder_kl",
        "diffusers.models.transformers.transformer_sd3",
        "transformers.models.clip.modeling_clip",
        "transformers.models.t5.modeling_t5",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
        "peft",  # the trainer's: it imports transformers' generation code and accelerate
    ),
    "sana": (
        "diffusers.models.autoencoders.autoencoder_dc",
        "diffusers.models.transformers.sana_transformer",
        "transformers.models.gemma2.modeling_gemma2",
        "diffusers.pipelines.sana.pipeline_sana",
        "peft",
    ),
}


def _import_all(names: tuple[str, ...], quiet: bool) -> None:
    with MODEL_LOAD_LOCK:
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - the real import later reports the error properly
                log.debug("background import of %s failed: %s", name, exc)
        if quiet:
            quiet_libraries()


def quiet_libraries() -> None:
    """Our progress bars and messages only: the libraries' own bars and notices drown them."""
    import warnings

    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


def warm_imports(family: str = "sd3", *, quiet: bool = False) -> threading.Thread:
    """Start the imports (and, with `quiet`, silence the libraries once imported) on a daemon thread."""
    thread = threading.Thread(target=_import_all, args=(MODULES.get(family, ()), quiet), name="warm-imports",
                              daemon=True)
    thread.start()
    return thread

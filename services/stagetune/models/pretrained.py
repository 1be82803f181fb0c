"""What every family's text and latent encoders share: where the weights are, loaded on first use, and a
fingerprint of everything that changes their output.

An encoder is built before any weights are read: the caching stages need only its fingerprint to compute
cache keys, and a run whose entries are all cached never loads the model. Several threads may ask for the
model at once (a stage tokenises ahead while another batch encodes); the lock makes that one load.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar, Self

import torch

from stagetune.models.fingerprint import model_fingerprint


class PretrainedEncoder:
    """A frozen model from a diffusers folder or hub id, on one device and dtype, loaded on first use.

    Subclasses name their family and component, list the subfolders whose files change their output, and
    load the model. `quantisation` maps a component (SimpleTuner's `text_encoder_N`) to its precision
    (`int8-quanto`, …); it is part of the fingerprint because a quantised encoder gives other outputs.
    """

    family: ClassVar[str]
    component: ClassVar[str]

    def __init__(self, loaded: Any = None, *, name_or_path: str, revision: str | None, dtype: torch.dtype,
                 device: torch.device, quantisation: Mapping[str, str] | None = None) -> None:
        self._model = loaded
        self._lock = threading.Lock()
        self.name_or_path = name_or_path
        self.revision = revision
        self.dtype = dtype
        self.device = device
        self.quantisation = {k: v for k, v in sorted((quantisation or {}).items()) if v not in ("", "no_change")}

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, revision: str | None = None,
                        dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                        load: bool = True, **kwargs: Any) -> Self:
        """`dtype=None` means float32, with float32's fingerprint: callers that leave it unset share caches.
        With `load=False` the weights are read on first use."""
        encoder = cls(name_or_path=name_or_path, revision=revision,
                      dtype=torch.float32 if dtype is None else dtype, device=torch.device(device), **kwargs)
        if load:
            encoder.model  # noqa: B018 - load now
        return encoder

    @property
    def model(self) -> Any:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self.load()
        return self._model

    def load(self) -> Any:
        raise NotImplementedError

    def subfolders(self) -> list[str]:
        """The model folder's subfolders whose files change this encoder's output."""
        raise NotImplementedError

    @cached_property
    def fingerprint(self) -> str:
        """Weights, configs and tokenizers of the subfolders, plus dtype and quantisation."""
        extra: dict[str, Any] = {"family": self.family, "component": self.component, "dtype": str(self.dtype)}
        if self.quantisation:  # absent when unquantised, so full-precision caches keep their keys
            extra["quantisation"] = self.quantisation
        return model_fingerprint(self.name_or_path, self.subfolders(), revision=self.revision, extra=extra)


class PretrainedAutoencoder(PretrainedEncoder):
    """A family's VAE (or DC-AE): one subfolder of the model (`None`: a standalone repository, files at the
    top), and the latent scale from its config. Families add `load`, `downsample`, `latent_key`, `encode`."""

    component = "vae"

    def __init__(self, loaded: Any = None, *, subfolder: str | None = "vae", **kwargs: Any) -> None:
        super().__init__(loaded, **kwargs)
        self.subfolder = subfolder

    @property
    def vae(self) -> Any:
        return self.model

    def subfolders(self) -> list[str]:
        return [self.subfolder or ""]

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

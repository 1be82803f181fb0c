"""Sana latents for the VAE service: the deep-compression autoencoder (DC-AE), ×32, 32 channels, scale only.

DC-AE's encoder is deterministic (no posterior to sample), so the per-sample seeds the stage passes change
nothing here; the cached latent is `z · scaling_factor`, what `SanaPipeline` decodes after dividing.
"""

from __future__ import annotations

import torch

from stagetune.models.fingerprint import digest
from stagetune.models.pixels import check_pixels
from stagetune.models.pretrained import PretrainedAutoencoder
from stagetune.models.sana.components import load_vae


class SanaLatentEncoder(PretrainedAutoencoder):
    family = "sana"

    def load(self) -> torch.nn.Module:
        return load_vae(self.name_or_path, revision=self.revision, dtype=self.dtype, device=self.device,
                        subfolder=self.subfolder)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def latent_key(self, pixel_key: str) -> str:
        return digest("sana-latent-v1", pixel_key, self.fingerprint)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Pixels in [-1, 1] → float32 latents [B, 32, H/32, W/32], scaled."""
        check_pixels(pixels, self.downsample, seeds, what="the autoencoder")
        latent = self.vae.encode(pixels.to(device=self.device, dtype=self.dtype)).latent
        return latent.float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(device=self.device, dtype=torch.float32) / self.scaling_factor
        return self.vae.decode(z.to(self.dtype)).sample.float()

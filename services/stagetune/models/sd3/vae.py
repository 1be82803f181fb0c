"""SD3 latents for the VAE service: sampled per sample from its own seed, scaled as the transformer expects.

A latent is a sample of the VAE's posterior, ``mean + std · noise``. Each sample's noise comes from its own
generator seeded with that sample's seed, so a cached latent does not depend on which batch, shard or worker
encoded it: re-encoding a sample anywhere gives the same tensor, and the cache stays content-addressed.
"""

from __future__ import annotations

import torch

from stagetune.models.fingerprint import digest
from stagetune.models.pixels import check_pixels
from stagetune.models.pretrained import PretrainedAutoencoder
from stagetune.models.sd3.components import load_vae


class SD3LatentEncoder(PretrainedAutoencoder):
    """Encode pixels to SD3 training latents ``(z − shift_factor) · scaling_factor`` and decode them back.

    ``subfolder=None`` reads a standalone VAE repository (its files at the top).
    """

    family = "sd3"

    def load(self) -> torch.nn.Module:
        return load_vae(self.name_or_path, revision=self.revision, dtype=self.dtype, device=self.device,
                        subfolder=self.subfolder)

    @property
    def shift_factor(self) -> float:
        return float(self.vae.config.shift_factor or 0.0)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_key(self, pixel_key: str) -> str:
        """Cache key of a latent: the key of its pixels (image bytes, crop, size) under this VAE."""
        return digest("sd3-latent-v1", pixel_key, self.fingerprint)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        """Pixels in [-1, 1], one seed per sample → float32 latents [B, C, H/8, W/8], already scaled."""
        check_pixels(pixels, self.downsample, seeds)
        pixels = pixels.to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        posterior = self.vae.encode(pixels).latent_dist
        mean = posterior.mean.float()
        std = posterior.std.float()
        # Noise is drawn on the CPU in float32 so the same seed gives the same latent on any device and dtype.
        noise = torch.stack(
            [
                torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(seed)))
                for seed in seeds
            ]
        ).to(mean.device)
        z = mean + std * noise
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → float32 pixels (about [-1, 1], not clamped), for previews and tests."""
        z = latents.to(device=self.device, dtype=torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float()

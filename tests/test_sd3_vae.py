"""SD3 latents: shapes, SD3's shift and scale, one noise stream per sample seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stagetune.core.errors import InputError
from stagetune.models.sd3.vae import SD3LatentEncoder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture(scope="module")
def encoder(tiny_sd3_path: Path) -> SD3LatentEncoder:
    return SD3LatentEncoder.from_pretrained(str(tiny_sd3_path))


def _pixels(batch: int, height: int = 64, width: int = 48, seed: int = 7) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_factors(encoder: SD3LatentEncoder) -> None:
    assert (encoder.shift_factor, encoder.scaling_factor) == (0.0609, 1.5305)
    assert encoder.downsample == 8 and encoder.latent_channels == 16
    latents = encoder.encode(_pixels(3), seeds=[1, 2, 3])
    assert latents.shape == (3, 16, 8, 6) and latents.dtype == torch.float32


def test_latents_are_scaled_samples_of_the_posterior(encoder: SD3LatentEncoder) -> None:
    pixels = _pixels(2)
    latents = encoder.encode(pixels, seeds=[11, 12])
    with torch.no_grad():
        posterior = encoder.vae.encode(pixels).latent_dist
    noise = torch.stack([torch.randn(16, 8, 6, generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
    expected = (posterior.mean + posterior.std * noise - 0.0609) * 1.5305
    assert (latents - expected).abs().max().item() <= 1e-6
    assert posterior.std.min().item() > 0  # the sample really differs from the mean
    assert (latents - (posterior.mean - 0.0609) * 1.5305).abs().max().item() > 1e-3

    decoded = encoder.decode(latents)
    with torch.no_grad():
        reference = encoder.vae.decode(latents / 1.5305 + 0.0609).sample
    assert decoded.shape == pixels.shape
    assert (decoded - reference).abs().max().item() <= 1e-6


def test_seeds_decide_the_noise(encoder: SD3LatentEncoder) -> None:
    pixels = _pixels(2)
    first = encoder.encode(pixels, seeds=[5, 6])
    assert torch.equal(first, encoder.encode(pixels, seeds=[5, 6]))
    swapped = encoder.encode(pixels, seeds=[6, 5])
    assert not torch.allclose(first[0], swapped[0])


def test_a_latent_does_not_depend_on_its_batch(encoder: SD3LatentEncoder) -> None:
    pixels = _pixels(3)
    seeds = [101, 202, 303]
    batch = encoder.encode(pixels, seeds=seeds)
    for i, seed in enumerate(seeds):
        alone = encoder.encode(pixels[i : i + 1], seeds=[seed])
        assert (batch[i] - alone[0]).abs().max().item() <= 1e-5
    reordered = encoder.encode(pixels[[2, 0]], seeds=[303, 101])
    assert (reordered[0] - batch[2]).abs().max().item() <= 1e-5


def test_latent_key_follows_pixels_and_vae(encoder: SD3LatentEncoder, tiny_sd3_path: Path) -> None:
    key = encoder.latent_key("pixels-abc")
    assert len(key) == 32 and key == encoder.latent_key("pixels-abc")
    assert encoder.latent_key("pixels-abd") != key
    assert SD3LatentEncoder.from_pretrained(str(tiny_sd3_path), dtype=None).fingerprint == encoder.fingerprint
    half = SD3LatentEncoder.from_pretrained(str(tiny_sd3_path), dtype=torch.bfloat16)
    assert half.fingerprint != encoder.fingerprint and half.latent_key("pixels-abc") != key
    assert half.vae.dtype == torch.bfloat16


def test_bad_inputs_are_named(encoder: SD3LatentEncoder) -> None:
    with pytest.raises(InputError, match="seeds"):
        encoder.encode(_pixels(2), seeds=[1])
    with pytest.raises(InputError, match=r"\[2, 3, 60, 48\]|multiple"):
        encoder.encode(_pixels(2, height=60), seeds=[1, 2])
    with pytest.raises(InputError, match="B, 3, H, W"):
        encoder.encode(torch.zeros(3, 64, 64), seeds=[1])

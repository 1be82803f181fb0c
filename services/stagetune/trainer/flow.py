"""Flow-matching training targets (SD3, Sana): DESIGN.md §6.

σ is drawn per sample from a logit-normal (default), uniform or Beta distribution, shifted
statically (σ' = sσ / (1 + (s − 1)σ)) or by resolution (s = exp(mu), mu linear in the latent
sequence length, from the scheduler config); the model sees x_t = (1 − σ)x + σ·noise at
t = 1000σ and learns the velocity noise − x under MSE.
"""

from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    shift: float = 3.0
    auto_shift: bool = False
    use_uniform: bool = False
    use_beta: bool = False
    beta_alpha: float = 2.0
    beta_beta: float = 2.0
    sigmoid_scale: float = 1.0
    # From the scheduler config (FlowMatchEulerDiscreteScheduler's dynamic shifting parameters).
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    #: A family's own discrete σ table (Sana): σ is one of its entries, drawn uniformly; no shift applies.
    sigma_table: tuple[float, ...] = ()

    def mu(self, seq_len: int) -> float:
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (seq_len - self.base_seq_len)

    def shift_for(self, seq_len: int) -> float:
        return math.exp(self.mu(seq_len)) if self.auto_shift else self.shift


def sample_sigmas(schedule: FlowSchedule, generators: list[torch.Generator], seq_len: int) -> torch.Tensor:
    """σ in (0, 1), one per sample, each drawn from that sample's own generator: a sample's σ does not depend
    on which batch or process it lands in, and a resumed run draws what the uninterrupted one drew."""
    if schedule.sigma_table:  # SimpleTuner's Sana: index = floor(u · N), clamped to the table
        table = torch.tensor(schedule.sigma_table)
        u = torch.cat([torch.rand(1, generator=g) for g in generators])
        return table[(u * len(table)).long().clamp(max=len(table) - 1)]
    if schedule.use_beta:
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        alpha, beta_ = (torch.tensor(v, dtype=torch.float64) for v in (schedule.beta_alpha, schedule.beta_beta))
        # Inverse-CDF sampling keeps every draw on our generators (Beta.sample would use the global RNG).
        sigmas = _beta_icdf(u, torch.distributions.Beta(alpha, beta_)).float()
    elif schedule.use_uniform:
        sigmas = torch.cat([torch.rand(1, generator=g) for g in generators])
    else:
        sigmas = torch.sigmoid(torch.cat([torch.randn(1, generator=g) for g in generators]) * schedule.sigmoid_scale)
    s = schedule.shift_for(seq_len)
    if s != 1.0:
        sigmas = s * sigmas / (1 + (s - 1) * sigmas)
    return sigmas


def _beta_icdf(u: torch.Tensor, beta: torch.distributions.Beta, points: int = 1 << 16) -> torch.Tensor:
    """Inverse CDF from a fine grid of the density (torch has no Beta icdf), linear in between."""
    grid = torch.linspace(0, 1, points + 1, dtype=torch.float64)[1:-1]
    pdf = beta.log_prob(grid).exp()
    cdf = torch.cumsum(pdf, 0)
    cdf = cdf / cdf[-1]
    idx = torch.searchsorted(cdf, u).clamp(1, len(cdf) - 1)
    c0, c1 = cdf[idx - 1], cdf[idx]
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
    return grid[idx - 1] + frac * (grid[idx] - grid[idx - 1])


def noisy_input(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t and the velocity target for a batch."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents


def timesteps_for(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * 1000.0


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The flow-matching loss; with a loss mask [B, 1, h, w] in [0, 1], SimpleTuner's masked loss: the squared
    error weighted by the mask and averaged over every element (not renormalised by the mask's area)."""
    if mask is None:
        return torch.nn.functional.mse_loss(pred, target)
    return ((pred - target) ** 2 * mask.to(pred.dtype)).mean()

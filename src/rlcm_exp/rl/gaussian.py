"""Log-density of a diagonal Gaussian action, averaged over latent elements.

Both samplers treat one denoising step as a Gaussian action x_next ~ N(mean_theta, std^2 I).
Summing log-densities over the C*H*W latent elements gives numbers in the tens of thousands
whose differences overflow exp(); like every peer we average over elements instead, so the PPO
clip range (1e-4) is in per-element units.
"""

from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Element-averaged log N(x; mean, std^2) per sample.

    x, mean: (B, ...) latents; std: broadcastable to x (scalar or (B, 1, 1, 1)); computed in fp32.
    Returns (B,) float32.
    """
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return log_density.mean(dim=tuple(range(1, x.ndim)))

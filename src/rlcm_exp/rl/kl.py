"""KL divergence of the trained policy to the base model, per transition.

Both are Gaussians with the same theta-independent std sigma (LCM: sqrt(1 - abar_next); DDIM: eta
times the posterior std), so KL(N(mu_theta, sigma^2) || N(mu_base, sigma^2)) per latent element is
(mu_theta - mu_base)^2 / (2 sigma^2). Averaged over the elements, like the log-probs (gaussian.py),
so `algo.kl_coef` is in the same per-element units as the policy loss.
"""

from __future__ import annotations

import torch


def gaussian_kl_same_std(mean: torch.Tensor, base_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B,) element-averaged KL(N(mean, std^2) || N(base_mean, std^2)), float32; grad flows to both means."""
    mean, base_mean, std = mean.float(), base_mean.float(), std.float()
    per_element = (mean - base_mean) ** 2 / (2 * std**2)
    return per_element.mean(dim=tuple(range(1, mean.ndim)))

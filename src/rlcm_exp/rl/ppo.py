"""Clipped policy-gradient objective (PPO without a value function) and its diagnostics."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PPOSettings:
    """Loss settings of the update, shared by RLCM and DDPO (values differ per algo config)."""

    clip_range: float = 1e-4  # eps: ratios are clipped to [1 - eps, 1 + eps]
    adv_clip_max: float = 10.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]


def clip_advantages(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    return advantages.clamp(-adv_clip_max, adv_clip_max)


def ppo_loss(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))) with r = exp(new - old).

    Returns the loss and detached diagnostics: approx_kl = 0.5 * mean((new - old)^2),
    clipfrac = mean(|r - 1| > eps), ratio mean and max |r - 1|.
    """
    log_ratio = new_log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max_dev": (ratio - 1.0).abs().max(),
        }
    return loss, info

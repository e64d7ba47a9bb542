"""Group-relative advantages (GRPO as in Flow-GRPO arXiv 2505.05470 and DanceGRPO arXiv 2505.07818):
each prompt of a round is sampled k times with its own noise, and each reward is normalised by its
own group's mean (and std): A_i = (r_i - mean_g) / (std_g + eps). Stateless: nothing persists
across rounds, unlike the per-prompt tracker (stat_tracker.py)."""

from __future__ import annotations

from typing import Any

import numpy as np


def group_normalise(
    rewards: np.ndarray, groups: np.ndarray, scale_by_std: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """(r - group mean) / (group std + eps) per element; without `scale_by_std`, r - group mean.
    `groups` holds each reward's group id; a group of one gets advantage 0. Population std (ddof 0)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(groups)
    if rewards.shape != groups.shape:
        raise ValueError(f"{rewards.shape[0]} rewards but {groups.shape[0]} group ids")
    out = np.empty_like(rewards)
    for g in np.unique(groups):
        mask = groups == g
        centred = rewards[mask] - rewards[mask].mean()
        out[mask] = centred / (rewards[mask].std() + eps) if scale_by_std else centred
    return out


def group_advantages(
    rewards: np.ndarray,
    prompts: list[str],
    groups: np.ndarray,
    tracker: Any,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """The `algo.advantage` of GRPO and REBEL: normalise within each sampled group (the prompts and
    the per-prompt tracker are not used; the signature is the loop's for every advantage)."""
    return group_normalise(rewards, groups, scale_by_std, eps)

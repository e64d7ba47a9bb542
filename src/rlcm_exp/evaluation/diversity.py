"""Within-prompt diversity of a round's images: an over-optimisation monitor that needs no download.

Features are the images downsampled to 8 x 8 pixels per channel (3 x 64 numbers in [0, 1]); for
every prompt that occurs at least twice in the round, the mean Euclidean distance over its pairs of
samples; the round's diversity is the mean over those prompts (NaN when no prompt repeats). With
GRPO every prompt has a group; with per-prompt sampling only the prompts drawn twice count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_SIDE = 8  # pixels per side after downsampling


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> (B, 3 * 8 * 8) float32 area-averaged pixels."""
    return F.adaptive_avg_pool2d(images.float(), FEATURE_SIDE).flatten(1)


def within_prompt_diversity(features: torch.Tensor, prompts: list[str]) -> float:
    """Mean over prompts with >= 2 samples of their mean pairwise L2 feature distance; NaN if none."""
    if len(prompts) != features.shape[0]:
        raise ValueError(f"{len(prompts)} prompts but {features.shape[0]} feature rows")
    per_prompt = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        if len(idx) < 2:
            continue
        dist = torch.cdist(features[idx].double(), features[idx].double())
        n = len(idx)
        per_prompt.append(float(dist.sum()) / (n * (n - 1)))  # the diagonal is zero
    return sum(per_prompt) / len(per_prompt) if per_prompt else math.nan

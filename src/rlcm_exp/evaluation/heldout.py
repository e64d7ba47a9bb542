"""Held-out evaluation: fixed prompts x fixed seeds, scored by the task's reward. The trainer runs it
outside training time; the evaluation command runs it for a checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rlcm_exp.policies.base import Policy
from rlcm_exp.rewards.base import RewardFn, score_images

GRID_IMAGES = 16  # images kept for the sample grid (the first jobs)


def seeded_generators(seeds: list[int], device: torch.device | str) -> list[torch.Generator]:
    """One generator per image: an image then does not depend on the batch it was drawn in."""
    return [torch.Generator(device).manual_seed(s) for s in seeds]


@torch.no_grad()
def evaluate_policy(
    policy: Policy,
    reward_fn: RewardFn,
    prompts: list[str],
    seeds: list[int],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Mean reward over every (prompt, seed) pair; image i uses its own generator, so results do not
    depend on batch size or on the training run's random state. A reward that returns a dict also
    gets the mean of each of its other entries (e.g. the toy detector's "shape") in `eval_components`."""
    # seed-major: the first GRID_IMAGES jobs (the grid) cover as many prompts as possible
    jobs = [(p, s) for s in seeds for p in prompts]
    parts: dict[str, list[torch.Tensor]] = {}
    images: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        traj = policy.sample([p for p, _ in chunk], seeded_generators([s for _, s in chunk], device))
        out = score_images(reward_fn, traj.images, [p for p, _ in chunk])  # as training scores
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
        kept = sum(int(i.shape[0]) for i in images)
        images.append(traj.images[: max(0, GRID_IMAGES - kept)].cpu())
    values = {k: torch.cat(v).float().numpy().astype(np.float64) for k, v in parts.items()}
    r = values["reward"]
    parts.pop("reward")
    per_prompt = {p: float(r[i :: len(prompts)].mean()) for i, p in enumerate(prompts)}
    return {
        # every reward output per image, seeds x prompts (row j: seed j), for tables (evaluation/tables.py)
        "eval_values": {k: v.reshape(len(seeds), len(prompts)) for k, v in values.items()},
        "eval_reward_mean": float(np.nanmean(r)),
        "eval_reward_std": float(np.nanstd(r)),
        "eval_components": {k: float(torch.cat(v).nanmean()) for k, v in parts.items()},
        "eval_per_prompt": per_prompt,
        "eval_images": torch.cat(images),
        "eval_captions": [f"{p} (seed {s})" for p, s in jobs[:GRID_IMAGES]],
    }

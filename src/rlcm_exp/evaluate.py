"""Held-out evaluation: fixed prompts x fixed seeds, scored by the task's reward, outside training time."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reward_fn: Any,
    prompts: list[str],
    seeds: list[int],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Mean reward over every (prompt, seed) pair; image i uses its own generator, so results do not
    depend on batch size or on the training run's random state."""
    jobs = [(p, s) for p in prompts for s in seeds]
    rewards, images = [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        traj = policy.sample([p for p, _ in chunk], gens)
        out = reward_fn(traj.images, [p for p, _ in chunk])
        out = out["reward"] if isinstance(out, dict) else out
        rewards.append(torch.as_tensor(out, dtype=torch.float32).cpu().reshape(-1))
        images.append(traj.images[: max(0, 16 - sum(len(i) for i in images))].cpu())
    r = torch.cat(rewards).numpy().astype(np.float64)
    per_prompt = {p: float(r[i * len(seeds) : (i + 1) * len(seeds)].mean()) for i, p in enumerate(prompts)}
    return {
        "eval_reward_mean": float(np.nanmean(r)),
        "eval_reward_std": float(np.nanstd(r)),
        "eval_per_prompt": per_prompt,
        "eval_images": torch.cat(images),
        "eval_captions": [f"{p} (seed {s})" for p, s in jobs[:16]],
    }

"""The inference-time budget protocol (RLCM paper, Fig. 6): give each image a time budget, stop the
sampler when it is spent and decode its current estimate (`Policy.estimates`). Also the wall-clock
of full rollouts, which the budgets are chosen relative to."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlcm_exp.evaluation.heldout import seeded_generators
from rlcm_exp.policies.base import Generators, Policy
from rlcm_exp.rewards.base import RewardFn, as_reward_dict


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work issued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BudgetedRollout:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: the decoded estimate when the budget ran out
    steps_taken: int  # UNet calls (sampler steps) made before stopping
    seconds_per_image: float  # wall-clock of the batch (prompt encoding, steps, decoding) / batch size


@torch.no_grad()
def budgeted_sample(
    policy: Policy,
    prompts: list[str],
    generator: Generators,
    max_seconds: float | None = None,
    max_steps: int | None = None,
) -> BudgetedRollout:
    """Roll out until `max_seconds` per image (x batch size) or `max_steps` is spent, then decode.

    A step is not started when the time so far plus the mean step time would exceed the budget, so
    the budget is kept rather than overshot by one step; the first step always runs (there is no
    estimate before it). Decoding the estimate happens after the budget and is included in
    `seconds_per_image`. No budget and no step cap gives exactly `policy.sample`'s images.
    """
    device = policy.device
    budget = None if max_seconds is None else max_seconds * len(prompts)
    estimates = policy.estimates(prompts, generator)  # lazy: prompt encoding happens in the first step
    sync(device)
    start = time.perf_counter()
    first_step_at: float | None = None
    estimate: torch.Tensor | None = None
    steps = 0
    for estimate in estimates:  # noqa: B007 (the last estimate is used after the loop)
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
        if budget is not None:
            sync(device)
            now = time.perf_counter() - start
            if first_step_at is None:  # prompt encoding + first step: not a per-step cost
                first_step_at = now
                per_step = now
            else:
                per_step = (now - first_step_at) / (steps - 1)
            if now + per_step > budget:
                break
    assert estimate is not None
    images = policy.decode(estimate)
    sync(device)
    return BudgetedRollout(images, steps, (time.perf_counter() - start) / len(prompts))


@torch.no_grad()
def seconds_per_image(
    policy: Policy, prompts: list[str], batch_size: int, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Wall-clock seconds per image of a full rollout (`policy.sample`, decoding included) on the policy's
    device, averaged over `repeats` batches after `warmup` untimed ones (allocator, cuDNN autotuning)."""
    device = policy.device
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    for i in range(warmup):
        policy.sample(batch, torch.Generator(device).manual_seed(seed + i))
    sync(device)
    start = time.perf_counter()
    for i in range(repeats):
        policy.sample(batch, torch.Generator(device).manual_seed(seed + warmup + i))
    sync(device)
    return (time.perf_counter() - start) / (repeats * batch_size)


def budget_jobs(prompts: list[str], first_seed: int, n: int) -> list[tuple[str, int]]:
    """n (prompt, seed) pairs, the prompts taken in turn: job i is prompt i mod P with seed
    first_seed + i // P, so 4 prompts and n=100 give each prompt the seeds first_seed .. first_seed+24."""
    return [(prompts[i % len(prompts)], first_seed + i // len(prompts)) for i in range(n)]


@torch.no_grad()
def budget_curve(
    policy: Policy,
    reward_fn: RewardFn,
    jobs: list[tuple[str, int]],
    budgets: list[float],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """For each budget (seconds per image): mean/std reward of the (prompt, seed) jobs under that budget,
    the mean number of steps taken and the seconds per image actually used. Same jobs for every budget."""
    rows = []
    for budget in budgets:
        rewards, steps, seconds = [], [], []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            chunk_prompts = [p for p, _ in chunk]
            gens = seeded_generators([s for _, s in chunk], device)
            out = budgeted_sample(policy, chunk_prompts, gens, max_seconds=budget)
            rewards.append(as_reward_dict(reward_fn(out.images, chunk_prompts), len(chunk))["reward"])
            steps += [out.steps_taken] * len(chunk)
            seconds += [out.seconds_per_image] * len(chunk)
        arr = torch.cat(rewards).numpy().astype(np.float64)
        rows.append(
            {
                "budget_s": float(budget),
                "reward_mean": float(np.nanmean(arr)),
                "reward_std": float(np.nanstd(arr)),
                "steps_mean": float(np.mean(steps)),
                "seconds_per_image": float(np.mean(seconds)),
                "n": len(jobs),
            }
        )
    return rows


def auto_budgets(full_rollout_s: float, num_steps: int, points: int) -> list[float]:
    """`points` budgets from about one step's share of a full rollout up to the full rollout, geometric."""
    low = full_rollout_s / num_steps
    return [float(b) for b in np.geomspace(low, full_rollout_s, points)] if points > 1 else [full_rollout_s]

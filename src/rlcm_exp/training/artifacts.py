"""What a run writes besides its records: sample grids (RUN/samples/) and per-process rollout dumps
(RUN/rollouts/, train.dump_rollouts). Plain functions of the data; the trainer decides when."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlcm_exp.policies.trajectory import Trajectory


def dump_rollouts(
    folder: Path, epoch: int, rank: int, traj: Trajectory, rewards: torch.Tensor, advantages: torch.Tensor
) -> None:
    """Per-process record of a round, for debugging and for checking the multi-process arithmetic."""
    folder.mkdir(exist_ok=True)
    torch.save(
        {
            "prompts": traj.prompts,
            "rewards": rewards.cpu(),
            "advantages": advantages.cpu(),
            "initial_noise_sum": traj.latents[:, 0].float().flatten(1).sum(1).cpu(),
        },
        folder / f"epoch{epoch:04d}_rank{rank}.pt",
    )


def save_sample_grid(
    folder: Path, epoch: int, traj: Trajectory, rewards: torch.Tensor, count: int
) -> tuple[torch.Tensor, list[str]]:
    """The round's first `count` images as epoch_NNNN.png (a square-ish grid) and their captions
    (prompt | reward) as epoch_NNNN.txt; returns both, for the tracker."""
    from rlcm_exp.evaluation.png import save_png

    folder.mkdir(exist_ok=True)
    k = min(count, len(traj))
    images = traj.images[:k].float().cpu()
    save_png(images, folder / f"epoch_{epoch:04d}.png", nrow=int(math.ceil(math.sqrt(k))))
    captions = [f"{p} | {r:.3f}" for p, r in zip(traj.prompts[:k], rewards[:k].tolist(), strict=True)]
    (folder / f"epoch_{epoch:04d}.txt").write_text("\n".join(captions) + "\n")
    return images, captions

"""The per-call policy loss the loop backpropagates, as a small object the algo config picks
(`algo.loss`): PPOLoss (RLCM, DDPO, GRPO) or rebel.RebelLoss. The loop never asks which one runs.

Each UNet training call covers `per_call` of the `trained` transitions of a minibatch's B
trajectories, transition-major: element j * B + i is trajectory i at its j-th transition of the call.
The loop backpropagates `loss * per_call / (grad_accum_minibatches * trained)`, so a loss that is a
mean over its call's (trajectory, transition) pairs sums to the minibatch's mean over all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from rlcm_exp.rl.ppo import ppo_loss


@dataclass(frozen=True)
class LossInputs:
    """One UNet call's share of a minibatch (shapes (per_call * B,), transition-major)."""

    new_log_prob: torch.Tensor  # log pi_theta(a | s), with grad
    old_log_prob: torch.Tensor  # log pi_old(a | s) recorded while sampling
    advantages: torch.Tensor  # each element's trajectory advantage (clipped)
    clip_range: float  # algo.ppo.clip_range
    rows: int  # B: trajectories in the minibatch
    trained: int  # T_train: trained transitions per trajectory (all calls of the minibatch)
    # (B,) sum over all T_train trained transitions of (new - old) per trajectory, no grad; only
    # filled for a loss whose `needs_log_ratio_totals` is True (a no-grad pass computes it first)
    log_ratio_totals: torch.Tensor | None = None


class Loss(Protocol):
    needs_log_ratio_totals: ClassVar[bool]

    def __call__(self, batch: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class PPOLoss:
    """The clipped objective of DDPO / RLCM (rl/ppo.py), per (trajectory, transition) pair."""

    needs_log_ratio_totals: ClassVar[bool] = False

    def __call__(self, batch: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return ppo_loss(batch.new_log_prob, batch.old_log_prob, batch.advantages, batch.clip_range)

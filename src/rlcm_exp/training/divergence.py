"""A diverged run stops: non-finite loss, gradients, weights or ratio_first after an epoch's update
end the run with a message naming the epoch and the likely cause, before anything of that epoch is
recorded, evaluated or checkpointed; RUN_DIR/diverged.json (tracking.mark_diverged) says so to
whoever reads the run later (analysis/sweep.py marks such a run rather than rank it)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rlcm_exp.errors import RunStopped


class Diverged(RunStopped):
    """The run's numbers stopped being finite; the entry point prints the message and exits 1."""


def nonfinite(stats: Mapping[str, float], params: Sequence[torch.Tensor], grads_checked: bool) -> list[str]:
    """What is not finite after an update: `loss` and `ratio_first` of the update's metrics, the
    gradient norm (only when `grads_checked`: under an fp16 grad scaler an inf gradient is a skipped
    step, not a divergence), and the trained weights."""
    keys = ("loss", "ratio_first") + (("grad_norm",) if grads_checked else ())
    bad = [f"{k} {stats[k]}" for k in keys if k in stats and not math.isfinite(stats[k])]
    if any(not bool(torch.isfinite(p.detach()).all()) for p in params):
        bad.append("weights")
    return bad


def diverged_message(epoch: int, bad: list[str], lr: float, max_grad_norm: float) -> str:
    return (
        f"the run diverged at epoch {epoch}: non-finite {', '.join(bad)} after the update. Likely cause: "
        f"a learning rate too high (optimizer.lr={lr:g}); else an unstable reward or advantage scale "
        f"(algo.ppo.adv_clip_max, train.max_grad_norm={max_grad_norm:g}). Nothing of epoch {epoch} was "
        "recorded or checkpointed; start a new run with a lower optimizer.lr."
    )

"""REBEL (Gao et al., arXiv 2404.16767): regress the difference of two trajectories' log-ratios onto
the difference of their rewards. For pairs (y, y') of the same prompt,

    loss = mean over pairs of ( (lr(y) - lr(y')) / eta - (A(y) - A(y')) )^2,
    lr(y) = sum over trained transitions t of (log pi_theta(a_t | s_t) - log pi_old(a_t | s_t)),

averaged over the batch's pairs (the RLCM authors' REBEL code sums over the batch, which scales the
gradient with the batch size). With group-centred advantages without std (algo.advantage
scale_by_std false), A(y) - A(y') = r(y) - r(y'): the paper's reward difference.

Pairs are adjacent rows of a minibatch (rows 2i, 2i+1), which the loop guarantees by shuffling whole
groups (algo.group_size even, train.train_batch_size a multiple of it). The loss is quadratic in a
sum over every trained transition, but the loop backpropagates one UNet call (`per_call`
transitions) at a time; so it is written as a surrogate with the same gradient: with the pair's
residual rho = (D / eta - dA) computed beforehand without grad (D from `log_ratio_totals`), each call
contributes mean_pairs(2 rho / eta * (lr_call(y) - lr_call(y'))), whose gradients over the calls sum
to the loss's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rlcm_exp.rl.objective import LossInputs


def rebel_loss_value(
    log_ratio_sums: torch.Tensor, advantages: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, residuals): rows 2i and 2i+1 form pair i; log_ratio_sums and advantages are (2P,)."""
    d_log_ratio = log_ratio_sums[0::2] - log_ratio_sums[1::2]
    d_adv = advantages[0::2] - advantages[1::2]
    residual = d_log_ratio / eta - d_adv
    return (residual**2).mean(), residual


@dataclass(frozen=True)
class RebelLoss:
    """`algo.loss` of REBEL; eta scales the log-ratio difference (the paper's 1/eta regression)."""

    eta: float = 1.0
    needs_log_ratio_totals: ClassVar[bool] = True

    def __call__(self, batch: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if batch.log_ratio_totals is None or batch.rows % 2:
            raise ValueError("REBEL needs the trajectories' log-ratio totals and whole pairs of rows")
        rows = batch.rows
        log_ratio = batch.new_log_prob - batch.old_log_prob
        per_row = log_ratio.view(-1, rows).sum(0)  # this call's transitions, per trajectory
        adv = batch.advantages.view(-1, rows)[0]
        loss, residual = rebel_loss_value(batch.log_ratio_totals, adv, self.eta)
        surrogate = (2 * residual.detach() / self.eta * (per_row[0::2] - per_row[1::2])).mean()
        per_call = log_ratio.numel() // rows
        # the loop scales every call's loss by per_call / trained (a per-pair mean); undo it here
        scaled = surrogate * batch.trained / per_call
        with torch.no_grad():
            ratio = torch.exp(log_ratio)
            info = {
                "loss": loss.detach(),
                "approx_kl": 0.5 * (log_ratio**2).mean(),
                "clipfrac": torch.zeros((), device=ratio.device),  # REBEL does not clip
                "ratio_mean": ratio.mean(),
                "ratio_max_dev": (ratio - 1.0).abs().max(),
            }
        return scaled, info

"""The algorithm's second half: one round's trajectories and advantages -> optimizer steps.

An update is a component the algo config names (`algo.update._target_`); the trainer runs rounds and
calls it without knowing which one it holds. `PolicyGradientUpdate` is the update of RLCM, DDPO,
GRPO and REBEL: clipped (or REBEL) losses on the ratios of recorded transitions. An update that
trains on the outcome instead (the final clean latent against a reference, as DiffusionNFT, AWM
or Diffusion-DPO do) is another class with the same call, reading `traj.final_latents`.

What every update may use is in `UpdateContext`: the policy, the accelerator, the batch plan, the
algorithm's settings whole, the optimizer side (`Optimization.step()` clips, steps, schedules and
updates the EMA) and the seed streams.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rl.gaussian import gaussian_log_prob
from rlcm_exp.rl.kl import gaussian_kl_same_std
from rlcm_exp.rl.objective import Loss, LossInputs
from rlcm_exp.rl.ppo import PPOSettings
from rlcm_exp.training.batching import BatchPlan
from rlcm_exp.training.ema import EMA


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, epoch, process, purpose): per-epoch streams make resumed runs exact."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def trained_steps(n: int, t_window: int, t_train: int, generator: torch.Generator) -> torch.Tensor:
    """(n, t_train) transition indices to train: per trajectory, t_train distinct ones drawn uniformly
    from its first t_window transitions (index 0 is the noisiest), in random order."""
    return torch.argsort(torch.rand(n, t_window, generator=generator), dim=1)[:, :t_train]


def group_order(n: int, group_size: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of n trajectories that keeps each group (group_size consecutive ones) together
    and in place; group_size 1 is torch.randperm(n) itself (same draws, same order)."""
    perm = torch.randperm(n // group_size, generator=generator)
    return (perm[:, None] * group_size + torch.arange(group_size)).reshape(-1)


@dataclass
class Optimization:
    """The optimizer side of a run, the same for every update: the trained parameters, optimizer, LR
    schedule, gradient clip (train.max_grad_norm), EMA (train.ema_decay) and the optimizer-step count
    (checkpointed by the trainer)."""

    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    params: list[torch.nn.Parameter]
    max_grad_norm: float
    ema: EMA | None = None
    steps: int = 0

    def step(self) -> torch.Tensor:
        """Clip, step, schedule, zero, EMA; returns the gradient norm before clipping (a tensor: no host sync)."""
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()  # after the optimizer (the reference code had it before)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.ema is not None:
            self.ema.update()
        return grad_norm


class AlgoView(Protocol):
    """The algorithm's settings as an update sees them: training/settings.py's AlgoSettings (which
    names this module's default update, so it is described here rather than imported)."""

    name: str
    group_size: int
    loss: Loss
    ppo: PPOSettings
    kl_coef: float
    recompute_old_log_probs: bool | str  # auto | true | false (PolicyGradientUpdate)


@dataclass
class UpdateContext:
    """What an update may use, handed to it on every call by the trainer."""

    policy: Policy
    accelerator: Accelerator
    plan: BatchPlan
    algo: AlgoView  # the algorithm's settings whole (AlgoSettings: loss, ppo, kl_coef, group_size, ...)
    optimization: Optimization
    seed: int  # the run's seed: derive_seed(seed, epoch, rank, purpose, ...) gives exact-resume streams

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


class Update(Protocol):
    """One round's update: train on this process's trajectories and advantages, step the optimizer
    through `ctx.optimization.step()`, and return the round's training metrics (floats, averaged over
    the round; `ratio_first` is expected of updates that recompute recorded transitions)."""

    def __call__(
        self, ctx: UpdateContext, epoch: int, traj: Trajectory, advantages: torch.Tensor
    ) -> dict[str, float]: ...


@contextmanager
def lora_disabled(ctx: UpdateContext) -> Iterator[None]:
    """The base model: the denoiser with its LoRA switched off, for the KL to the base."""
    denoiser = ctx.accelerator.unwrap_model(ctx.policy.denoiser)
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def round_layout(ctx: UpdateContext, epoch: int, inner: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner epoch `inner`'s trajectory order (n,) and trained transition indices (n, t_train), drawn
    from its own stream: the same on every call (an exact resume, a recomputation ahead of time)."""
    plan = ctx.plan
    g = torch.Generator().manual_seed(derive_seed(ctx.seed, epoch, ctx.rank, 2, inner))
    order = group_order(n, ctx.algo.group_size, g)  # whole groups: REBEL's pairs share a minibatch
    return order, trained_steps(n, plan.eligible_transitions, plan.trained_transitions, g)


def call_rows(
    rows: torch.Tensor, steps: torch.Tensor, j: int, per_call: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(trajectory, transition) indices of the UNet call holding a minibatch's transitions j..j+per_call,
    transition-major: the rows repeat per transition."""
    return rows.repeat(per_call), steps[:, j : j + per_call].T.reshape(-1)


class PolicyGradientUpdate:
    """Inner epochs over shuffled minibatches x per-sample shuffled transitions, one optimizer step per
    accumulation: the update of RLCM, DDPO, GRPO and REBEL. The per-call loss is `algo.loss` (clipped
    PPO or REBEL), plus `algo.kl_coef` x the KL to the base model.

    `algo.recompute_old_log_probs`: before the first optimizer step, the round's old log-probs (of the
    first inner epoch's trained transitions) are recomputed with the training calls' batch layout and
    precision, so that the first ratios are exactly 1. Under reduced precision the UNet's output
    depends on its batch size (~1e-2 for a bf16 SD UNet), sampling calls it at another size than
    training does, and a 1e-4 clip range would clip on noise. "auto": on under mixed precision
    (fp16/bf16), off in fp32 (where sampling and training agree to ~1e-6: fixed-seed results unchanged).
    Costs one no-grad forward per trained transition of the round."""

    def __init__(self, recompute_old_log_probs: bool | str | None = None) -> None:
        # None: `algo.recompute_old_log_probs` decides (the config's way); a value here overrides it
        self.recompute_old_log_probs = recompute_old_log_probs
        self._warned = False

    def recomputes(self, ctx: UpdateContext) -> bool:
        setting = self.recompute_old_log_probs
        setting = ctx.algo.recompute_old_log_probs if setting is None else setting
        if setting == "auto":
            return ctx.accelerator.mixed_precision != "no"
        return bool(setting)

    def __call__(
        self, ctx: UpdateContext, epoch: int, traj: Trajectory, advantages: torch.Tensor
    ) -> dict[str, float]:
        plan = ctx.plan
        adv = advantages.to(ctx.accelerator.device)
        n, bsz = len(traj), plan.train_batch_size
        sums: dict[str, Any] = {}
        count = 0
        first: dict[str, float] = {}
        if self.recomputes(ctx):
            traj = replace(traj, log_probs=recomputed_log_probs(ctx, epoch, traj))
        for inner in range(plan.inner_epochs):
            order, steps = round_layout(ctx, epoch, inner, n)
            for mb in tqdm(
                range(plan.minibatches_per_inner_epoch),
                desc=f"epoch {epoch} training",
                leave=False,
                disable=not ctx.accelerator.is_local_main_process,
            ):
                rows = order[mb * bsz : (mb + 1) * bsz]
                sync = (mb + 1) % plan.grad_accum_minibatches == 0
                first_call = inner == 0 and mb == 0  # before any optimizer step
                infos, ratios, kls = self._minibatch(ctx, traj, adv, rows, steps[rows], sync, first_call)
                for info in infos:
                    for key, v in info.items():
                        sums[key] = sums.get(key, 0.0) + v.float()
                count += len(infos)
                if first_call:  # training must recompute what sampling drew
                    r = torch.cat(ratios)
                    first = {
                        "ratio_first": float(r.mean()),
                        "ratio_first_max_dev": float((r - 1).abs().max()),
                        # the sampling policy's KL to the base model on the round's first training call
                        "kl_to_base": float(torch.cat(kls).mean()),
                    }
                if sync:  # a tensor: no host sync
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + ctx.optimization.step()
        out = {k: float(v) / count for k, v in sums.items() if k != "grad_norm"}
        out["grad_norm"] = float(sums.get("grad_norm", 0.0)) / max(plan.optimizer_steps_per_epoch, 1)
        if "clipfrac" in out and first:
            self._check_first_ratios(ctx, first["ratio_first_max_dev"])
        return {**out, **first}

    def warmup(
        self,
        ctx: UpdateContext,
        traj: Trajectory,
        advantages: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        per_call: int,
    ) -> None:
        """The forward + backward of minibatch `rows` on its `steps` (rows, width) transitions, `per_call`
        per call, as training runs them, without an optimizer step (training/autotune.py times it; the
        gradients it accumulates are the caller's to put back)."""
        width = steps.shape[1]
        plan = replace(
            ctx.plan, trained_transitions=width, transitions_per_forward=per_call, grad_accum_minibatches=1
        )
        adv = advantages.to(ctx.accelerator.device)
        self._minibatch(replace(ctx, plan=plan), traj, adv, rows, steps, True, False)

    def _check_first_ratios(self, ctx: UpdateContext, max_dev: float) -> None:
        """Warn (once per run) when the first minibatch's ratios, all 1 in exact arithmetic, already
        leave the clip range: the clipped loss then trains on precision noise."""
        clip = ctx.algo.ppo.clip_range
        if max_dev > clip and not self._warned and ctx.accelerator.is_main_process:
            self._warned = True
            warnings.warn(
                f"ratio_first_max_dev={max_dev:.2e} exceeds algo.ppo.clip_range={clip:g} before any optimizer "
                "step: sampling and training disagree numerically (reduced precision, a nondeterministic "
                "kernel). Set algo.recompute_old_log_probs=true, mixed_precision=no, or a wider clip range.",
                stacklevel=2,
            )

    def _minibatch(
        self,
        ctx: UpdateContext,
        traj: Trajectory,
        adv: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        sync: bool,
        record_first: bool,
    ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """Backward of one minibatch's trained transitions, `transitions_per_forward` of them stacked
        into each denoiser call. Each call's loss is the mean over its (trajectory, transition) pairs,
        so scaling it by the pairs' count keeps the gradient the mean of per-transition losses.
        With algo.kl_coef > 0 each call adds kl_coef x its mean KL to the base model. The first
        minibatch (record_first) also returns its ratios (ratio_first) and its first call's KLs
        (kl_to_base: measured whatever kl_coef, at the cost of one no-grad call per round)."""
        acc, plan, algo = ctx.accelerator, ctx.plan, ctx.algo
        t_train, per_call = plan.trained_transitions, plan.transitions_per_forward
        divisor = plan.grad_accum_minibatches * t_train
        # a loss of whole trajectories (REBEL) needs each one's log-ratio sum first: a no-grad pass,
        # unless one call holds all the trained transitions (transitions_per_forward 0)
        needs_totals = algo.loss.needs_log_ratio_totals
        totals = log_ratio_totals(ctx, traj, rows, steps) if needs_totals and per_call < t_train else None
        infos, ratios, kls = [], [], []
        for j in range(0, t_train, per_call):
            idx, k = call_rows(rows, steps, j, per_call)
            old_lp = traj.log_probs[idx, k].to(acc.device)
            with (
                acc.no_sync(ctx.policy.denoiser) if not (sync and j + per_call >= t_train) else nullcontext()
            ):
                with acc.autocast():
                    with_kl = algo.kl_coef > 0 or (record_first and j == 0)
                    new_lp, kl = log_prob_and_kl(ctx, traj, idx, k, with_kl)
                if needs_totals and per_call == t_train:
                    totals = (new_lp.detach().float() - old_lp).view(-1, len(rows)).sum(0)
                clip = algo.ppo.clip_range
                batch = LossInputs(new_lp, old_lp, adv[idx], clip, len(rows), t_train, totals)
                loss, info = algo.loss(batch)
                if algo.kl_coef > 0:
                    assert kl is not None
                    info["kl_penalty"] = kl.detach().mean()
                    loss = loss + algo.kl_coef * kl.mean()
                acc.backward(loss * per_call / divisor)  # per_call=1: exactly loss / divisor
            info.setdefault("loss", loss.detach())
            infos.append(info)
            if record_first:  # only the first minibatch's, for ratio_first and kl_to_base
                ratios.append(torch.exp(new_lp.detach() - old_lp))
                if j == 0:
                    assert kl is not None
                    kls.append(kl.detach())
        return infos, ratios, kls


def log_prob_and_kl(
    ctx: UpdateContext, traj: Trajectory, idx: torch.Tensor, k: torch.Tensor, with_kl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi_theta of the recorded actions (with grad) and, if asked, each transition's KL to the
    base model: the same denoiser with its LoRA disabled, no grad (rl/kl.py)."""
    latents, cond = traj.latents[idx, k], traj.conditioning[idx]
    mean, std = ctx.policy.action_mean_std(latents, k, cond)
    new_lp = gaussian_log_prob(traj.next_latents[idx, k], mean, std)  # = policy.log_prob, bit for bit
    if not with_kl:
        return new_lp, None
    with torch.no_grad(), lora_disabled(ctx):
        base_mean, _ = ctx.policy.action_mean_std(latents, k, cond)
    kl = gaussian_kl_same_std(mean if ctx.algo.kl_coef > 0 else mean.detach(), base_mean, std)
    return new_lp, kl


@torch.no_grad()
def log_ratio_totals(
    ctx: UpdateContext, traj: Trajectory, rows: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """(B,) sum over each trajectory's trained transitions of log pi_theta - log pi_old, no grad: a
    first pass for a loss of whole trajectories (REBEL), before its per-call backward passes."""
    acc, plan = ctx.accelerator, ctx.plan
    per_call, n = plan.transitions_per_forward, len(rows)
    totals = torch.zeros(n, device=acc.device)
    for j in range(0, plan.trained_transitions, per_call):
        idx, k = call_rows(rows, steps, j, per_call)
        with acc.autocast():
            new_lp = ctx.policy.log_prob(
                traj.latents[idx, k], traj.next_latents[idx, k], k, traj.conditioning[idx]
            )
        totals += (new_lp.float() - traj.log_probs[idx, k].to(acc.device)).view(-1, n).sum(0)
    return totals


@torch.no_grad()
def recomputed_log_probs(ctx: UpdateContext, epoch: int, traj: Trajectory) -> torch.Tensor:
    """(B, T) old log-probs with the first inner epoch's trained transitions recomputed under the
    current (not yet updated) weights, in exactly the calls training will make: the same rows and
    transitions per call, under the same autocast. Other transitions keep their sampled values."""
    acc, plan = ctx.accelerator, ctx.plan
    out = traj.log_probs.clone()
    order, steps = round_layout(ctx, epoch, 0, len(traj))
    bsz, per_call = plan.train_batch_size, plan.transitions_per_forward
    for mb in range(plan.minibatches_per_inner_epoch):
        rows = order[mb * bsz : (mb + 1) * bsz]
        for j in range(0, plan.trained_transitions, per_call):
            idx, k = call_rows(rows, steps[rows], j, per_call)
            with acc.autocast():
                new_lp, _ = log_prob_and_kl(ctx, traj, idx, k, with_kl=False)
            out[idx, k] = new_lp.float().to(out.device)
    return out

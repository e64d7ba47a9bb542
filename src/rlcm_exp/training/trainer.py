"""The epoch loop, shared by RLCM, DDPO, GRPO and REBEL: sample -> reward -> advantages -> update.

Nothing here knows which algorithm runs: the policy (LCM or DDIM sampler) supplies rollouts and
log-probs, the config supplies the numbers and three small pieces: the advantage function
(per-prompt tracker or group normalisation), the loss (PPO or REBEL) and the group size (images per
prompt). Read it top to bottom: `fit` runs the epochs, with the checkpoint cadence and preemption;
one epoch is `run_epoch`. Callbacks observe, never steer.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.diversity import pixel_features, within_prompt_diversity
from rlcm_exp.evaluation.heldout import evaluate_policy
from rlcm_exp.models.lora import load_lora_into, save_lora
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rewards.base import RewardFn, as_reward_dict
from rlcm_exp.rl.gaussian import gaussian_log_prob
from rlcm_exp.rl.kl import gaussian_kl_same_std
from rlcm_exp.rl.objective import Loss, LossInputs, PPOLoss
from rlcm_exp.rl.ppo import PPOSettings, clip_advantages
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker, per_prompt_advantages
from rlcm_exp.tracking import Logger, MetricsFile
from rlcm_exp.training.batching import BatchPlan
from rlcm_exp.training.callbacks import Callback
from rlcm_exp.training.checkpoint import checkpoint_dir, read_checkpoint, set_rng_state, write_checkpoint
from rlcm_exp.training.ema import EMA
from rlcm_exp.training.settings import TrainSettings

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume=auto continues


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits with PREEMPTED_EXIT_CODE."""


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


def with_gold(reward_fn: RewardFn, gold_fn: RewardFn) -> RewardFn:
    """The task's reward with the gold reward's score of the same images as its component "gold"."""

    def scored(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = as_reward_dict(reward_fn(images, prompts), len(prompts))
        return {**out, "gold": as_reward_dict(gold_fn(images, prompts), len(prompts))["reward"]}

    return scored


class Trainer:
    """Holds what persists across epochs (optimizer, tracker, counters); `run_epoch` is the algorithm."""

    def __init__(
        self,
        policy: Any,
        reward_fn: RewardFn,
        prompts: list[str],
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        params: list[torch.nn.Parameter],
        tracker: PerPromptStatTracker,
        plan: BatchPlan,
        settings: TrainSettings,
        ppo: PPOSettings,
        accelerator: Accelerator,
        run_dir: Path,
        seed: int,
        logger: Logger,
        eval_prompts: list[str] | None = None,
        callbacks: Sequence[Callback] = (),
        group_size: int = 1,
        advantage_fn: Callable[..., np.ndarray] = per_prompt_advantages,
        loss_fn: Loss | None = None,
        kl_coef: float = 0.0,
        ema: EMA | None = None,
        gold_reward_fn: RewardFn | None = None,
    ) -> None:
        self.policy, self.reward_fn, self.prompts = policy, reward_fn, list(prompts)
        self.eval_prompts = list(eval_prompts or [])
        self.optimizer, self.lr_scheduler, self.params = optimizer, lr_scheduler, params
        self.tracker, self.plan, self.settings, self.ppo = tracker, plan, settings, ppo
        self.accelerator, self.run_dir, self.seed, self.logger = accelerator, run_dir, seed, logger
        self.rank = accelerator.process_index
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.eval_file = MetricsFile(run_dir / "eval.jsonl", enabled=accelerator.is_main_process)
        self.pool = ThreadPoolExecutor(settings.reward_workers) if settings.reward_workers > 0 else None
        self.epoch = 0
        self.optimizer_steps = 0
        self.reward_queries = 0
        self.elapsed_s = 0.0  # wall-clock of training epochs (sampling, reward, update, logging)
        self.nonfinite_in_a_row = 0
        self.eval_images: dict[str, dict[str, Any]] = {}  # first/last evaluation's grid (analysis.summary)
        self.stop_requested = False  # set by SIGTERM/SIGUSR1: checkpoint at the next epoch boundary, exit
        self.budget_spent = False  # train.max_wallclock_s reached: this epoch is the run's last
        self.logger_run_id: str | None = None
        self.callbacks = list(callbacks)
        # algo.group_size images per prompt; algo.advantage, algo.loss, algo.kl_coef; train.ema_decay
        self.group_size, self.advantage_fn, self.kl_coef = group_size, advantage_fn, kl_coef
        self.loss_fn: Loss = PPOLoss() if loss_fn is None else loss_fn
        self.ema, self.gold_reward_fn = ema, gold_reward_fn

    # ------------------------------------------------------------------ the run

    def fit(self) -> list[dict[str, Any]]:
        """Epochs from `self.epoch` to `settings.epochs`, checkpoints every `checkpoint_every` and at the
        end, the final LoRA in checkpoints/final. SIGTERM/SIGUSR1 ask for a checkpoint at the next epoch
        boundary, then `Preempted` is raised."""
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.epoch == 0 and self._eval_due(0):  # the base model's held-out score: the "before"
            self.evaluate(0)

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        records = []
        try:
            for epoch in range(self.epoch, self.settings.epochs):
                if self.budget_spent:  # a resumed run whose budget was already spent
                    break
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                records.append(self.run_epoch(epoch))
                self._print_epoch(records[-1])
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, records[-1])
                self._checkpoint_or_stop(epoch)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.close()
            self.logger.finish()
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(self.policy.unet)
            self._timed_checkpoint(lambda: save_lora(unet, self.run_dir / "checkpoints" / "final"))
            if self.ema is not None:  # what `ema=true` samples, evaluates and exports
                with self.ema.swapped():
                    self._timed_checkpoint(
                        lambda: save_lora(unet, self.run_dir / "checkpoints" / "final_ema")
                    )
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return records

    def _checkpoint_or_stop(self, epoch: int) -> None:
        stop = self.should_stop()
        every, epochs = self.settings.checkpoint_every, self.settings.epochs
        if stop or (every > 0 and self.epoch % every == 0) or self.epoch == epochs or self.budget_spent:
            self._timed_checkpoint(self.save_checkpoint)
        if stop:
            raise Preempted(
                f"stopped by a signal after epoch {epoch}; checkpoint written, resume with resume=auto"
            )

    def _timed_checkpoint(self, write: Callable[[], Path]) -> None:
        start = time.perf_counter()
        folder = write()
        for cb in self.callbacks:
            cb.on_checkpoint(self, folder, time.perf_counter() - start)

    def _print_epoch(self, rec: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            print(
                f"epoch {rec['epoch']}: reward {rec['reward_mean']:.4f} +- {rec['reward_std']:.4f}  "
                f"kl {rec['approx_kl']:.2e}  clipfrac {rec['clipfrac']:.3f}  ratio_first {rec['ratio_first']:.6f}  "
                f"t {rec['wallclock_s']:.1f}s"
            )

    # ------------------------------------------------------------------ sampling and rewards

    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        out = as_reward_dict(self.reward_fn(images, prompts), len(prompts))
        return out, time.perf_counter() - start

    def sample_round(self, epoch: int) -> tuple[Trajectory, dict[str, torch.Tensor], dict[str, float]]:
        """Sample this process's share of the epoch; rewards of batch i are scored while batch i+1 samples.

        Sampling batch b of the epoch (numbered globally, process r owning a contiguous block) draws
        its prompts and noise from streams seeded by (seed, epoch, b): processes get different noise,
        and the gathered round is the same whatever the number of processes.
        """
        plan, device = self.plan, self.accelerator.device
        trajectories: list[Trajectory] = []
        pending: list[Future | tuple] = []
        t_sample = 0.0
        first = self.rank * plan.sampling_batches
        for b in tqdm(
            range(first, first + plan.sampling_batches),
            desc=f"epoch {epoch} sampling",
            leave=False,
            disable=not self.accelerator.is_local_main_process,
        ):
            generator = torch.Generator(device=device).manual_seed(derive_seed(self.seed, epoch, b, 0))
            prompt_rng = np.random.default_rng([self.seed, epoch, b, 1])
            # a group's k copies of a prompt are consecutive and in one batch (algo.group_size divides
            # train.sample_batch_size), each with its own noise; k = 1 draws exactly as before
            drawn = prompt_rng.integers(len(self.prompts), size=plan.sample_batch_size // self.group_size)
            batch_prompts = [self.prompts[i] for i in np.repeat(drawn, self.group_size)]
            start = time.perf_counter()
            with self.accelerator.autocast():
                traj = self.policy.sample(batch_prompts, generator)
            t_sample += time.perf_counter() - start
            trajectories.append(traj)
            if self.pool is not None:
                pending.append(self.pool.submit(self._score, traj.images, batch_prompts))
            else:
                pending.append(self._score(traj.images, batch_prompts))
        start = time.perf_counter()
        results = [p.result() if isinstance(p, Future) else p for p in pending]
        t_wait = time.perf_counter() - start if self.pool is not None else 0.0
        rewards = {k: torch.cat([r[0][k] for r in results]) for k in results[0][0]}
        timing = {
            "time_sample_s": t_sample,
            "time_reward_s": sum(r[1] for r in results),
            "time_reward_wait_s": t_wait,
        }
        return Trajectory.cat(trajectories), rewards, timing

    def advantages(self, prompts: list[str], rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Gather rewards and prompts from every process, normalise (per prompt or per group: algo.advantage),
        return this process's share. Groups are consecutive in the gathered round (each lives in one
        sampling batch), so group i is rows [i k, (i + 1) k) whatever the number of processes."""
        acc = self.accelerator
        all_rewards = acc.gather(rewards.to(acc.device)).cpu().numpy().astype(np.float64)
        all_prompts = gather_object(prompts) if acc.num_processes > 1 else list(prompts)
        finite = np.isfinite(all_rewards)
        stats = self._count_nonfinite(all_rewards)
        adv = np.zeros_like(all_rewards)
        # non-finite rewards never reach the tracker; their samples get zero advantage, i.e. no gradient
        if finite.any():
            groups = np.arange(len(all_rewards)) // self.group_size
            adv[finite] = self.advantage_fn(
                all_rewards[finite],
                [p for p, f in zip(all_prompts, finite, strict=True) if f],
                groups[finite],
                self.tracker,
            )
        n = len(prompts)
        local = torch.as_tensor(adv[self.rank * n : (self.rank + 1) * n], dtype=torch.float32)
        stats.update(
            reward_mean=float(all_rewards[finite].mean()) if finite.any() else float("nan"),
            reward_std=float(all_rewards[finite].std()) if finite.any() else float("nan"),
        )
        return clip_advantages(local, self.ppo.adv_clip_max), stats

    def _count_nonfinite(self, rewards: np.ndarray) -> dict[str, float]:
        bad = ~np.isfinite(rewards)
        for is_bad in bad:
            self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if is_bad else 0
            if self.nonfinite_in_a_row >= self.settings.max_nonfinite_in_a_row:
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} non-finite rewards in a row (train.max_nonfinite_in_a_row="
                    f"{self.settings.max_nonfinite_in_a_row}): the reward is broken or the policy diverged. "
                    f"Metrics so far are in {self.run_dir / 'metrics.jsonl'}."
                )
        return {"reward_nonfinite": float(bad.sum())}

    # ------------------------------------------------------------------ the update

    def update(self, epoch: int, traj: Trajectory, advantages: torch.Tensor) -> dict[str, float]:
        """Inner epochs over shuffled minibatches x per-sample shuffled transitions; one step per accumulation."""
        plan = self.plan
        adv = advantages.to(self.accelerator.device)
        n, bsz = len(traj), plan.train_batch_size
        sums: dict[str, Any] = {}
        count = 0
        first: dict[str, float] = {}
        for inner in range(plan.inner_epochs):
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, 2, inner))
            order = group_order(n, self.group_size, g)  # whole groups: REBEL's pairs share a minibatch
            steps = trained_steps(n, plan.eligible_transitions, plan.trained_transitions, g)
            for mb in tqdm(
                range(plan.minibatches_per_inner_epoch),
                desc=f"epoch {epoch} training",
                leave=False,
                disable=not self.accelerator.is_local_main_process,
            ):
                rows = order[mb * bsz : (mb + 1) * bsz]
                sync = (mb + 1) % plan.grad_accum_minibatches == 0
                first_call = inner == 0 and mb == 0  # before any optimizer step
                infos, ratios, kls = self._minibatch(traj, adv, rows, steps[rows], sync, first_call)
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
                if sync:
                    sums["grad_norm"] = (
                        sums.get("grad_norm", 0.0) + self._optimizer_step()
                    )  # a tensor: no host sync
        out = {k: float(v) / count for k, v in sums.items() if k != "grad_norm"}
        out["grad_norm"] = float(sums.get("grad_norm", 0.0)) / max(plan.optimizer_steps_per_epoch, 1)
        return {**out, **first}

    def _minibatch(
        self,
        traj: Trajectory,
        adv: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        sync: bool,
        record_first: bool,
    ) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """Backward of one minibatch's trained transitions, `transitions_per_forward` of them stacked
        into each UNet call. Each call's loss is the mean over its (trajectory, transition) pairs, so
        scaling it by the pairs' count keeps the gradient the mean of today's per-transition losses.
        With algo.kl_coef > 0 each call adds kl_coef x its mean KL to the base model. The first
        minibatch (record_first) also returns its ratios (ratio_first) and its first call's KLs
        (kl_to_base: measured whatever kl_coef, at the cost of one no-grad UNet call per round)."""
        acc, plan = self.accelerator, self.plan
        t_train, per_call = plan.trained_transitions, plan.transitions_per_forward
        divisor = plan.grad_accum_minibatches * t_train
        # a loss of whole trajectories (REBEL) needs each one's log-ratio sum first: a no-grad pass,
        # unless one call holds all the trained transitions (transitions_per_forward 0)
        needs_totals = self.loss_fn.needs_log_ratio_totals
        totals = self._log_ratio_totals(traj, rows, steps) if needs_totals and per_call < t_train else None
        infos, ratios, kls = [], [], []
        for j in range(0, t_train, per_call):
            k = steps[:, j : j + per_call].T.reshape(-1)  # transition-major: rows repeat per transition
            idx = rows.repeat(per_call)
            old_lp = traj.log_probs[idx, k].to(acc.device)
            with acc.no_sync(self.policy.unet) if not (sync and j + per_call >= t_train) else nullcontext():
                with acc.autocast():
                    with_kl = self.kl_coef > 0 or (record_first and j == 0)
                    new_lp, kl = self._log_prob_and_kl(traj, idx, k, with_kl)
                if needs_totals and per_call == t_train:
                    totals = (new_lp.detach().float() - old_lp).view(-1, len(rows)).sum(0)
                batch = LossInputs(new_lp, old_lp, adv[idx], self.ppo.clip_range, len(rows), t_train, totals)
                loss, info = self.loss_fn(batch)
                if self.kl_coef > 0:
                    assert kl is not None
                    info["kl_penalty"] = kl.detach().mean()
                    loss = loss + self.kl_coef * kl.mean()
                acc.backward(loss * per_call / divisor)  # per_call=1: exactly today's loss / divisor
            info.setdefault("loss", loss.detach())
            infos.append(info)
            if record_first:  # only the first minibatch's, for ratio_first and kl_to_base
                ratios.append(torch.exp(new_lp.detach() - old_lp))
                if j == 0:
                    assert kl is not None
                    kls.append(kl.detach())
        return infos, ratios, kls

    def _log_prob_and_kl(
        self, traj: Trajectory, idx: torch.Tensor, k: torch.Tensor, with_kl: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi_theta of the recorded actions (with grad) and, if asked, each transition's KL to the
        base model: the same UNet with its LoRA disabled, no grad (rl/kl.py)."""
        latents, embeds = traj.latents[idx, k], traj.prompt_embeds[idx]
        mean, std = self.policy.action_mean_std(latents, k, embeds)
        new_lp = gaussian_log_prob(traj.next_latents[idx, k], mean, std)  # = policy.log_prob, bit for bit
        if not with_kl:
            return new_lp, None
        with torch.no_grad(), self._lora_disabled():
            base_mean, _ = self.policy.action_mean_std(latents, k, embeds)
        kl = gaussian_kl_same_std(mean if self.kl_coef > 0 else mean.detach(), base_mean, std)
        return new_lp, kl

    @contextmanager
    def _lora_disabled(self) -> Iterator[None]:
        unet = self.accelerator.unwrap_model(self.policy.unet)
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()

    @torch.no_grad()
    def _log_ratio_totals(self, traj: Trajectory, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(B,) sum over each trajectory's trained transitions of log pi_theta - log pi_old, no grad: a
        first pass for a loss of whole trajectories (REBEL), before its per-call backward passes."""
        acc, plan = self.accelerator, self.plan
        per_call, n = plan.transitions_per_forward, len(rows)
        totals = torch.zeros(n, device=acc.device)
        for j in range(0, plan.trained_transitions, per_call):
            k = steps[:, j : j + per_call].T.reshape(-1)
            idx = rows.repeat(per_call)
            with acc.autocast():
                new_lp = self.policy.log_prob(
                    traj.latents[idx, k], traj.next_latents[idx, k], k, traj.prompt_embeds[idx]
                )
            totals += (new_lp.float() - traj.log_probs[idx, k].to(acc.device)).view(-1, n).sum(0)
        return totals

    def _optimizer_step(self) -> torch.Tensor:
        grad_norm = self.accelerator.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()  # after the optimizer (the reference code had it before)
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update()
        return grad_norm

    # ------------------------------------------------------------------ one epoch

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        acc = self.accelerator
        start = time.perf_counter()
        traj, rewards, timing = self.sample_round(epoch)
        advantages, reward_stats = self.advantages(traj.prompts, rewards["reward"])
        if self.settings.dump_rollouts:
            self.dump_rollouts(epoch, traj, rewards["reward"], advantages)
        t_train = time.perf_counter()
        update_stats = self.update(epoch, traj, advantages)
        timing["time_train_s"] = time.perf_counter() - t_train
        self.reward_queries += self.plan.samples_per_epoch
        self.elapsed_s += time.perf_counter() - start
        self.budget_spent = self._budget_reached()
        image_start = time.perf_counter()
        self.maybe_save_images(epoch, traj, rewards["reward"])
        self.elapsed_s += time.perf_counter() - image_start
        components = {
            f"reward/{k}": float(acc.gather(v.to(acc.device)).float().nanmean())
            for k, v in rewards.items()
            if k != "reward"
        }
        components.update(self._diversity(traj))
        record = {
            "epoch": epoch,
            **reward_stats,
            **components,
            **update_stats,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "optimizer_steps": self.optimizer_steps,
            "reward_queries": self.reward_queries,
            "wallclock_s": self.elapsed_s,
            "gpu_hours": self.gpu_hours(),
            **timing,
        }
        if self._eval_due(epoch + 1):  # after this epoch's update; excluded from wallclock_s
            record.update(self.evaluate(epoch + 1))
        self.metrics.write(record)
        if acc.is_main_process:
            self.logger.log(record, step=epoch)
        self.epoch = epoch + 1
        return record

    def _diversity(self, traj: Trajectory) -> dict[str, float]:
        """The round's within-prompt diversity (evaluation/diversity.py) over every process's images;
        empty (no key written) when no prompt occurs twice in the round."""
        acc = self.accelerator
        features = acc.gather(pixel_features(traj.images.to(acc.device))).cpu()
        prompts = gather_object(traj.prompts) if acc.num_processes > 1 else list(traj.prompts)
        value = within_prompt_diversity(features, prompts)
        return {} if math.isnan(value) else {"diversity": value}

    def _eval_due(self, epochs_done: int) -> bool:
        every = self.settings.eval_every
        return (
            bool(self.eval_prompts)
            and every > 0
            and (epochs_done % every == 0 or epochs_done == self.settings.epochs or self.budget_spent)
        )

    def _budget_reached(self) -> bool:
        """True on every process once the slowest one's training wall-clock reaches train.max_wallclock_s."""
        budget = self.settings.max_wallclock_s
        if budget is None:
            return False
        spent = torch.tensor([self.elapsed_s], device=self.accelerator.device)
        return bool(self.accelerator.gather(spent).max().item() >= budget)

    def evaluate(self, epochs_done: int) -> dict[str, Any]:
        """Held-out prompts x fixed seeds on the main process; its time is reported, not counted as training."""
        start = time.perf_counter()
        out: dict[str, Any] = {}
        if self.accelerator.is_main_process:
            gold = self.gold_reward_fn
            reward_fn = self.reward_fn if gold is None else with_gold(self.reward_fn, gold)
            with self._eval_weights(), self.accelerator.autocast():
                res = evaluate_policy(
                    self.policy,
                    reward_fn,
                    self.eval_prompts,
                    list(range(self.settings.eval_seeds)),
                    self.plan.sample_batch_size,
                    self.accelerator.device,
                )
            self.logger.log_images("eval_samples", res["eval_images"], res["eval_captions"], step=epochs_done)
            out = {
                "eval_reward_mean": res["eval_reward_mean"],
                "eval_reward_std": res["eval_reward_std"],
                **{f"eval_reward/{k}": v for k, v in res["eval_components"].items() if k != "gold"},
            }
            if gold is not None:  # the held-out "gold" reward: rises with the task's, or over-optimisation
                out["eval_gold_reward_mean"] = res["eval_components"]["gold"]
            self._keep_eval_images(epochs_done, res)
            if epochs_done == 0:  # the base model's score reaches the tracker as a number, at x = epoch -1
                before = {"eval_reward_before": out["eval_reward_mean"], **out}
                self.logger.log({**before, "epoch": -1, "wallclock_s": 0.0, "gpu_hours": 0.0}, step=-1)
            self.eval_file.write(
                {
                    "epochs_done": epochs_done,
                    **out,
                    "eval_per_prompt": res["eval_per_prompt"],
                    "wallclock_s": self.elapsed_s,
                    "gpu_hours": self.gpu_hours(),
                    "reward_queries": self.reward_queries,
                }
            )
        self.accelerator.wait_for_everyone()
        out["time_eval_s"] = time.perf_counter() - start
        return out

    def _eval_weights(self) -> AbstractContextManager[None]:
        """The EMA weights for held-out evaluation when train.ema_decay and train.eval_ema are set."""
        return self.ema.swapped() if self.ema is not None and self.settings.eval_ema else nullcontext()

    def _keep_eval_images(self, epochs_done: int, res: dict[str, Any]) -> None:
        """The evaluation's grid images (distinct prompts first), labelled, for before_after.png: every
        evaluation's in RUN/eval/epoch_NNNN.png, the first's also as tensors (epoch_0000.pt), so that a
        resumed run's grid still shows the run's real "before"."""
        from rlcm_exp.analysis.summary import load_eval_images, save_eval_images, select_eval_images

        snap = select_eval_images(res, self.eval_prompts, list(range(self.settings.eval_seeds)), epochs_done)
        folder = self.run_dir / "eval"
        save_eval_images(folder, snap, tensors=epochs_done == 0)
        if "first" not in self.eval_images:  # after a resume the first evaluation ran in an earlier process
            self.eval_images["first"] = snap if epochs_done == 0 else load_eval_images(folder) or snap
        self.eval_images["last"] = snap

    def gpu_hours(self) -> float:
        """Device-hours so far: training wall-clock x (processes + reward-server GPUs)."""
        return self.elapsed_s * (self.accelerator.num_processes + self.settings.reward_server_gpus) / 3600.0

    def dump_rollouts(
        self, epoch: int, traj: Trajectory, rewards: torch.Tensor, advantages: torch.Tensor
    ) -> None:
        """Per-process record of a round, for debugging and for checking the multi-process arithmetic."""
        folder = self.run_dir / "rollouts"
        folder.mkdir(exist_ok=True)
        torch.save(
            {
                "prompts": traj.prompts,
                "rewards": rewards.cpu(),
                "advantages": advantages.cpu(),
                "initial_noise_sum": traj.latents[:, 0].float().flatten(1).sum(1).cpu(),
            },
            folder / f"epoch{epoch:04d}_rank{self.rank}.pt",
        )

    def maybe_save_images(self, epoch: int, traj: Trajectory, rewards: torch.Tensor) -> None:
        s = self.settings
        last = epoch == s.epochs - 1 or self.budget_spent
        periodic = s.save_images_every > 0 and epoch % s.save_images_every == 0
        if not self.accelerator.is_main_process or s.save_images <= 0 or not (epoch == 0 or last or periodic):
            return
        from torchvision.utils import save_image

        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        k = min(s.save_images, len(traj))
        images = traj.images[:k].float().cpu()
        save_image(images, folder / f"epoch_{epoch:04d}.png", nrow=int(math.ceil(math.sqrt(k))))
        captions = [f"{p} | {r:.3f}" for p, r in zip(traj.prompts[:k], rewards[:k].tolist(), strict=True)]
        (folder / f"epoch_{epoch:04d}.txt").write_text("\n".join(captions) + "\n")
        self.logger.log_images("samples", images, captions, step=epoch)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        """Everything besides weights/optimizer that an exact resume needs (sampling and shuffling
        streams derive from (seed, epoch, ...), so the epoch number restores them)."""
        return {
            "epoch": self.epoch,
            "optimizer_steps": self.optimizer_steps,
            "reward_queries": self.reward_queries,
            "elapsed_s": self.elapsed_s,
            "gpu_hours": self.gpu_hours(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "stat_tracker": self.tracker.state_dict(),
            "logger_run_id": self.logger_run_id,
            "world_size": self.accelerator.num_processes,
        }

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        return write_checkpoint(
            checkpoint_dir(self.run_dir, self.epoch),
            is_main=acc.is_main_process,
            rank=self.rank,
            unet=acc.unwrap_model(self.policy.unet),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=acc.scaler,
            state=self.state(),
            barrier=acc.wait_for_everyone,
            keep_last=self.settings.keep_last,
            extra={} if self.ema is None else {"ema": self.ema.state_dict()},
        )

    def restore(self, candidates: Sequence[Path], fall_back: bool = True) -> Path | None:
        """Load the first of `candidates` whose files load; a newer checkpoint with a truncated or
        corrupt file is skipped with a warning (fall_back) or refused. Returns the folder used."""
        for folder in candidates:
            try:
                ckpt = read_checkpoint(folder, self.rank, self.accelerator.device)
            except Exception as err:  # torch, safetensors and json each raise their own type
                if not fall_back:
                    raise ConfigError(f"resume={folder}: the checkpoint does not load ({err})") from err
                warnings.warn(
                    f"checkpoint {folder} does not load ({type(err).__name__}: {err}); trying the one before",
                    stacklevel=2,
                )
                continue
            self._apply_checkpoint(folder, ckpt)
            return folder
        return None

    def _apply_checkpoint(self, folder: Path, ckpt: dict[str, Any]) -> None:
        acc = self.accelerator
        state = ckpt["state"]
        if state["world_size"] != acc.num_processes:
            raise RuntimeError(
                f"{folder} was written by {state['world_size']} processes, this run has {acc.num_processes}: "
                "resume with the same number of processes"
            )
        load_lora_into(acc.unwrap_model(self.policy.unet), ckpt["lora"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ConfigError(f"{folder} holds no EMA weights (ema.pt) but train.ema_decay is set")
            self.ema.load_state_dict(ckpt["ema"])
        self.tracker.load_state_dict(state["stat_tracker"])
        self.epoch, self.optimizer_steps = state["epoch"], state["optimizer_steps"]
        self.reward_queries, self.elapsed_s = state["reward_queries"], state["elapsed_s"]
        self.budget_spent = self._budget_reached()
        self.nonfinite_in_a_row, self.logger_run_id = state["nonfinite_in_a_row"], state["logger_run_id"]
        if acc.is_main_process:  # records past the checkpoint will be written again, identically
            for f in (self.metrics, self.eval_file):
                f.truncate(lambda r: r.get("epoch", r.get("epochs_done", 0) - 1) < self.epoch)

    def should_stop(self) -> bool:
        """True on every process if any process was asked to stop (signals may reach only some)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).max().item() > 0)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

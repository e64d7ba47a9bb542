"""The epoch loop, shared by every algorithm: sample -> reward -> advantages -> update.

Nothing here knows which algorithm runs: the policy supplies rollouts and log-probs (a denoiser
plus a per-step Gaussian), the algo config supplies the numbers and the pieces: the advantage
function (per-prompt tracker or group normalisation) and the update (training/update.py: today's
policy-gradient update with its loss, or a user's own class). Read it top to bottom: `fit` runs
the epochs, with the checkpoint cadence and preemption; one epoch is `run_epoch`. Callbacks
observe, never steer.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from rlcm_exp.evaluation.diversity import pixel_features, within_prompt_diversity
from rlcm_exp.evaluation.heldout import evaluate_policy
from rlcm_exp.models.lora import save_lora
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rewards.base import RewardFn, as_reward_dict
from rlcm_exp.rewards.timeout import RewardTimeout, TimedReward
from rlcm_exp.rl.multi_reward import RewardNormalisation
from rlcm_exp.tracking import DIVERGED_FILE, Logger, MetricsFile, mark_diverged
from rlcm_exp.training.artifacts import dump_rollouts, save_sample_grid
from rlcm_exp.training.autotune import AUTO, choose
from rlcm_exp.training.batching import BatchPlan
from rlcm_exp.training.callbacks import Callback
from rlcm_exp.training.checkpoint import (
    rng_state,
)
from rlcm_exp.training.divergence import Diverged, diverged_message, nonfinite
from rlcm_exp.training.ema import EMA
from rlcm_exp.training.resumable import Resumable
from rlcm_exp.training.rounds import RoundAdvantages, RoundSampler
from rlcm_exp.training.settings import AlgoSettings, TrainSettings
from rlcm_exp.training.update import Optimization, UpdateContext

PREEMPTED_EXIT_CODE = (
    75  # EX_TEMPFAIL: stopped by a STOP_SIGNALS signal after a checkpoint; resume=auto continues
)
# SIGTERM (SLURM's, Kubernetes'), SIGUSR1 (`sbatch --signal`), SIGUSR2 (submitit's preemption/timeout signal)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits with PREEMPTED_EXIT_CODE.
    `signum`: the signal that asked for the stop on this process (None: another process's)."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = signum


class Abandoned(BaseException):
    """Raised by the STOP_SIGNALS handler inside the phase that may be dropped (sampling and scoring
    a round: nothing of the epoch is applied yet), so a reward that hangs cannot outlive preemption. A BaseException:
    no `except Exception` of a reward or a library on the way swallows it."""


def with_gold(reward_fn: RewardFn, gold_fn: RewardFn) -> RewardFn:
    """The task's reward with the gold reward's score of the same images as its component "gold"."""

    def scored(images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = as_reward_dict(reward_fn(images, prompts), len(prompts))
        return {**out, "gold": as_reward_dict(gold_fn(images, prompts), len(prompts))["reward"]}

    return scored


class Trainer(Resumable):
    """Holds what persists across epochs (counters, the round's components); `run_epoch` is one round.

    A round is `sampler` (rollouts + rewards) -> `advantages` -> `algo.update` (the algorithm's second
    half, a plug-in: training/update.py) -> records. The trainer never knows which update it holds."""

    def __init__(
        self,
        policy: Policy,
        algo: AlgoSettings,
        reward_fn: RewardFn,
        prompts: list[str],
        optimization: Optimization,
        plan: BatchPlan,
        settings: TrainSettings,
        accelerator: Accelerator,
        run_dir: Path,
        seed: int,
        logger: Logger,
        eval_prompts: list[str] | None = None,
        callbacks: Sequence[Callback] = (),
        gold_reward_fn: RewardFn | None = None,
        normalisation: RewardNormalisation | None = None,
        run_identity: dict[str, Any] | None = None,
        transitions_cap: int | None = None,
    ) -> None:
        # every reward call bounded by train.reward_timeout_s, on a thread SIGTERM does not wait for
        reward_fn = TimedReward(reward_fn, settings.reward_timeout_s)
        gold_reward_fn = (
            None if gold_reward_fn is None else TimedReward(gold_reward_fn, settings.reward_timeout_s)
        )
        self.policy, self.algo, self.reward_fn, self.prompts = policy, algo, reward_fn, list(prompts)
        self.eval_prompts = list(eval_prompts or [])
        self.optimization, self.plan, self.settings = optimization, plan, settings
        self.accelerator, self.run_dir, self.seed, self.logger = accelerator, run_dir, seed, logger
        self.rank = accelerator.process_index
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.eval_file = MetricsFile(run_dir / "eval.jsonl", enabled=accelerator.is_main_process)
        self.sampler = RoundSampler(
            policy, reward_fn, prompts, accelerator, plan, seed, algo.group_size, settings.reward_workers
        )
        self.advantage = RoundAdvantages(  # normalisation: reward_normalisation=, bound to the reward
            algo, accelerator, settings.max_nonfinite_in_a_row, run_dir / "metrics.jsonl", normalisation
        )
        self.epoch = 0
        self.reward_queries = 0
        self.elapsed_s = 0.0  # wall-clock of training epochs (sampling, reward, update, logging)
        self.stop_requested = False  # set by STOP_SIGNALS: checkpoint at the next epoch boundary, exit
        self.stop_signal: int | None = None  # the signal that set it (handed back by the entry point)
        self._interruptible = False  # in a phase the signal handler abandons at once (one process only)
        self._untouched = True  # nothing of the current epoch applied yet: its state is the last epoch's
        self._epoch_rng: dict[str, Any] | None = None  # every RNG at the current epoch's start
        self.budget_spent = False  # train.max_wallclock_s reached: this epoch is the run's last
        self.logger_run_id: str | None = None  # the tracker's run id, checkpointed: a resume continues it
        self.callbacks = list(callbacks)
        self.gold_reward_fn = gold_reward_fn
        # run id + the config keys that define the run (rundir.run_identity), in every checkpoint: a
        # resume proves it continues the same run; a restore adopts the checkpoint's
        self.run_identity = run_identity
        # train.transitions_per_forward=auto: measured on this start's first round (training/autotune.py),
        # none above `transitions_cap` (the memory model's largest; None: no figure)
        self._tune_transitions = settings.transitions_per_forward == AUTO
        self.transitions_cap = transitions_cap

    # The optimizer side and the round's pieces under the names callers (tests, benchmarks) use.
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.optimization.optimizer

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.optimization.params

    @property
    def ema(self) -> EMA | None:
        return self.optimization.ema

    def sample_round(self, epoch: int) -> tuple[Trajectory, dict[str, torch.Tensor], dict[str, float]]:
        return self.sampler(epoch)

    def advantages(
        self, prompts: list[str], rewards: torch.Tensor | dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return self.advantage(prompts, rewards)

    def update(self, epoch: int, traj: Trajectory, advantages: torch.Tensor) -> dict[str, float]:
        """The algorithm's update (algo.update) on this process's share of the round."""
        ctx = UpdateContext(self.policy, self.accelerator, self.plan, self.algo, self.optimization, self.seed)
        if self._tune_transitions:  # once per process start, on the round's own first minibatch
            self._tune_transitions = False
            self.plan, line = choose(self.algo.update, ctx, traj, advantages, self.transitions_cap)
            ctx.plan = self.plan
            if self.accelerator.is_main_process:
                print(line)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "transitions_per_forward.txt").write_text(line + "\n")
        return self.algo.update(ctx, epoch, traj, advantages)

    # ------------------------------------------------------------------ the run

    def fit(self) -> list[dict[str, Any]]:
        """Epochs from `self.epoch` to `settings.epochs`, checkpoints every `checkpoint_every` and at the
        end, the final LoRA in checkpoints/final. STOP_SIGNALS ask for a checkpoint at the next epoch
        boundary, then `Preempted` is raised."""
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.accelerator.is_main_process:  # an earlier attempt's mark: this attempt decides anew
            (self.run_dir / DIVERGED_FILE).unlink(missing_ok=True)
        if self.epoch == 0 and self._eval_due(0):  # the base model's held-out score: the "before"
            self.evaluate(0)

        def request_stop(signum: int, frame: Any) -> None:
            self.stop_requested = True
            self.stop_signal = signum
            if self._interruptible:
                raise Abandoned

        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        records = []
        try:
            for epoch in range(self.epoch, self.settings.epochs):
                if self.budget_spent:  # a resumed run whose budget was already spent
                    break
                for cb in self.callbacks:
                    cb.on_epoch_start(self, epoch)
                try:
                    records.append(self.run_epoch(epoch))
                except (Abandoned, RewardTimeout) as stop:
                    self._stop_mid_epoch(epoch, stop)
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
            denoiser = self.accelerator.unwrap_model(self.policy.denoiser)
            self._timed_checkpoint(lambda: save_lora(denoiser, self.run_dir / "checkpoints" / "final"))
            if self.ema is not None:  # what `ema=true` samples, evaluates and exports
                with self.ema.swapped():
                    self._timed_checkpoint(
                        lambda: save_lora(denoiser, self.run_dir / "checkpoints" / "final_ema")
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
                f"stopped by a signal after epoch {epoch}; checkpoint written, resume with resume=auto",
                self.stop_signal,
            )

    def _stop_mid_epoch(self, epoch: int, stop: BaseException) -> None:
        """A signal (or a reward past its timeout) during epoch `epoch`: checkpoint the last finished
        epoch when nothing of this one was applied yet (one process: the others would wait in the
        checkpoint's barriers), then stop."""
        saved = self._untouched and self.accelerator.num_processes == 1 and self.epoch > 0
        if saved:
            self._timed_checkpoint(lambda: self.save_checkpoint(rng=self._epoch_rng))
        if isinstance(stop, RewardTimeout):
            raise stop
        done = f"checkpoint after epoch {self.epoch - 1} written" if saved else "no epoch finished yet"
        raise Preempted(
            f"stopped by a signal during epoch {epoch}'s sampling; {done}, resume with resume=auto",
            self.stop_signal,
        ) from None

    @contextmanager
    def _abandonable(self) -> Iterator[None]:
        """A phase the signal handler may abandon at once (Abandoned), single-process runs only: every
        process must reach the same collectives. A stop asked for just before counts."""
        if self.accelerator.num_processes > 1:
            yield
            return
        if self.stop_requested:
            raise Abandoned
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _timed_checkpoint(self, write: Callable[[], Path]) -> None:
        start = time.perf_counter()
        folder = write()
        for cb in self.callbacks:
            cb.on_checkpoint(self, folder, time.perf_counter() - start)

    def _print_epoch(self, rec: dict[str, Any]) -> None:
        """One line per epoch; the update's monitors where it reports them (an update that does not
        recompute recorded transitions has no ratio_first)."""
        if self.accelerator.is_main_process:
            shown = (
                ("approx_kl", "kl", ".2e"),
                ("clipfrac", "clipfrac", ".3f"),
                ("ratio_first", "ratio_first", ".6f"),
            )
            monitors = "".join(f"{label} {rec[key]:{fmt}}  " for key, label, fmt in shown if key in rec)
            print(
                f"epoch {rec['epoch']}: reward {rec['reward_mean']:.4f} +- {rec['reward_std']:.4f}  "
                f"{monitors}t {rec['wallclock_s']:.1f}s"
            )

    # ------------------------------------------------------------------ one epoch

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        acc = self.accelerator
        start = time.perf_counter()
        self._epoch_rng, self._untouched = rng_state(), True
        with self._abandonable():
            traj, rewards, timing = self.sample_round(epoch)
        self._untouched = False  # from here on (the advantages' trackers, the update) the epoch applies
        advantages, reward_stats = self.advantages(traj.prompts, rewards)
        if self.settings.dump_rollouts:
            dump_rollouts(self.run_dir / "rollouts", epoch, self.rank, traj, rewards["reward"], advantages)
        t_train = time.perf_counter()
        update_stats = self.update(epoch, traj, advantages)
        self._stop_if_diverged(epoch, update_stats)
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
            "lr": self.optimization.lr_scheduler.get_last_lr()[0],
            "optimizer_steps": self.optimization.steps,
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

    def _stop_if_diverged(self, epoch: int, stats: dict[str, float]) -> None:
        """Diverged (and RUN_DIR/diverged.json) when the update left anything non-finite; every
        process holds the same weights, so every process stops."""
        grads_checked = self.accelerator.scaler is None  # fp16's scaler skips inf steps by design
        bad = nonfinite(stats, self.params, grads_checked)
        if not bad:
            return
        lr = float(self.optimization.lr_scheduler.base_lrs[0])
        message = diverged_message(epoch, bad, lr, self.optimization.max_grad_norm)
        if self.accelerator.is_main_process:
            mark_diverged(self.run_dir, epoch, bad, message)
        raise Diverged(message)

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
            for cb in self.callbacks:  # e.g. the run summary's before/after grid (analysis.summary)
                cb.on_evaluation(self, epochs_done, res)
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

    def gpu_hours(self) -> float:
        """Device-hours so far: training wall-clock x (processes + reward-server GPUs)."""
        return self.elapsed_s * (self.accelerator.num_processes + self.settings.reward_server_gpus) / 3600.0

    def maybe_save_images(self, epoch: int, traj: Trajectory, rewards: torch.Tensor) -> None:
        """A grid of the round's images on the first and last epoch and every train.save_images_every."""
        s = self.settings
        last = epoch == s.epochs - 1 or self.budget_spent
        periodic = s.save_images_every > 0 and epoch % s.save_images_every == 0
        if not self.accelerator.is_main_process or s.save_images <= 0 or not (epoch == 0 or last or periodic):
            return
        images, captions = save_sample_grid(self.run_dir / "samples", epoch, traj, rewards, s.save_images)
        self.logger.log_images("samples", images, captions, step=epoch)

    def should_stop(self) -> bool:
        """True on every process if any process was asked to stop (signals may reach only some)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.gather(flag).max().item() > 0)

    def close(self) -> None:
        self.sampler.close()

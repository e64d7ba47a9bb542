"""A round's first half: rollouts, their rewards (scored while the next batch samples) and the
advantages of the gathered round. The update (update.py) is the second half.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rewards.base import RewardFn, score_images
from rlcm_exp.rl.multi_reward import RewardNormalisation, RoundRewards, SumOfRewards
from rlcm_exp.rl.ppo import clip_advantages
from rlcm_exp.training.batching import BatchPlan
from rlcm_exp.training.settings import AlgoSettings
from rlcm_exp.training.update import derive_seed

Rewards = dict[str, torch.Tensor]


class DaemonPool:
    """`submit` as ThreadPoolExecutor's, on daemon threads: concurrent.futures joins its workers when
    the process exits, so one reward call that hangs would keep a preempted run alive; these threads
    never hold up the exit. `shutdown` never waits."""

    def __init__(self, workers: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"reward-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            future, fn, args = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as err:  # delivered to whoever waits on the future
                    future.set_exception(err)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


class RoundSampler:
    """Samples this process's share of a round and scores it with the task's reward."""

    def __init__(
        self,
        policy: Policy,
        reward_fn: RewardFn,
        prompts: list[str],
        accelerator: Accelerator,
        plan: BatchPlan,
        seed: int,
        group_size: int,
        reward_workers: int,
    ) -> None:
        self.policy, self.reward_fn, self.prompts = policy, reward_fn, list(prompts)
        self.accelerator, self.plan, self.seed, self.group_size = accelerator, plan, seed, group_size
        self.pool = DaemonPool(reward_workers) if reward_workers > 0 else None

    def _score(self, images: torch.Tensor, prompts: list[str]) -> tuple[Rewards, float]:
        start = time.perf_counter()
        out = score_images(self.reward_fn, images, prompts)
        return out, time.perf_counter() - start

    def __call__(self, epoch: int) -> tuple[Trajectory, Rewards, dict[str, float]]:
        """Sample this process's share of the epoch; rewards of batch i are scored while batch i+1 samples.

        Sampling batch b of the epoch (numbered globally, process r owning a contiguous block) draws
        its prompts and noise from streams seeded by (seed, epoch, b): processes get different noise,
        and the gathered round is the same whatever the number of processes.
        """
        plan, acc = self.plan, self.accelerator
        trajectories: list[Trajectory] = []
        pending: list[Future | tuple] = []
        t_sample = 0.0
        first = acc.process_index * plan.sampling_batches
        for b in tqdm(
            range(first, first + plan.sampling_batches),
            desc=f"epoch {epoch} sampling",
            leave=False,
            disable=not acc.is_local_main_process,
        ):
            generator = torch.Generator(device=acc.device).manual_seed(derive_seed(self.seed, epoch, b, 0))
            prompt_rng = np.random.default_rng([self.seed, epoch, b, 1])
            # a group's k copies of a prompt are consecutive and in one batch (algo.group_size divides
            # train.sample_batch_size), each with its own noise; k = 1 draws exactly as before
            drawn = prompt_rng.integers(len(self.prompts), size=plan.sample_batch_size // self.group_size)
            batch_prompts = [self.prompts[i] for i in np.repeat(drawn, self.group_size)]
            start = time.perf_counter()
            with acc.autocast():
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

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class RoundAdvantages:
    """Gathers a round's rewards from every process, turns them into advantages (the configured
    reward normalisation: algo.advantage of the total, or of each weighted component on its own) and
    returns this process's share, clipped; counts non-finite rewards in a row."""

    def __init__(
        self,
        algo: AlgoSettings,
        accelerator: Accelerator,
        max_nonfinite_in_a_row: int,
        metrics_path: Path,
        normalisation: RewardNormalisation | None = None,
    ) -> None:
        self.algo, self.accelerator = algo, accelerator
        self.max_nonfinite_in_a_row, self.metrics_path = max_nonfinite_in_a_row, metrics_path
        self.normalisation: RewardNormalisation = (
            normalisation if normalisation is not None else SumOfRewards()
        )
        self.nonfinite_in_a_row = 0  # checkpointed

    def _gather(self, rewards: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        acc = self.accelerator
        return {
            k: acc.gather(rewards[k].to(acc.device)).cpu().numpy().astype(np.float64)
            for k in self.normalisation.keys
        }

    def __call__(
        self, prompts: list[str], rewards: torch.Tensor | Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """`rewards`: the reward's dict output (or its total alone, with reward_normalisation=sum).
        Groups are consecutive in the gathered round (each lives in one sampling batch), so group i
        is rows [i k, (i + 1) k) whatever the number of processes."""
        acc, algo = self.accelerator, self.algo
        gathered = self._gather({"reward": rewards} if isinstance(rewards, torch.Tensor) else rewards)
        all_rewards = gathered["reward"]
        all_prompts = gather_object(prompts) if acc.num_processes > 1 else list(prompts)
        finite = np.isfinite(all_rewards)
        stats = self._count_nonfinite(all_rewards)
        adv = np.zeros_like(all_rewards)
        # non-finite rewards never reach a tracker; their samples get zero advantage, i.e. no gradient
        if finite.any():
            groups = np.arange(len(all_rewards)) // algo.group_size
            adv[finite], extra = self.normalisation(
                RoundRewards(
                    {k: v[finite] for k, v in gathered.items()},
                    [p for p, f in zip(all_prompts, finite, strict=True) if f],
                    groups[finite],
                    algo.advantage,
                    algo.stat_tracker,
                )
            )
            stats.update(extra)
        n, rank = len(prompts), acc.process_index
        local = torch.as_tensor(adv[rank * n : (rank + 1) * n], dtype=torch.float32)
        stats.update(
            reward_mean=float(all_rewards[finite].mean()) if finite.any() else float("nan"),
            reward_std=float(all_rewards[finite].std()) if finite.any() else float("nan"),
        )
        return clip_advantages(local, algo.ppo.adv_clip_max), stats

    def _count_nonfinite(self, rewards: np.ndarray) -> dict[str, float]:
        bad = ~np.isfinite(rewards)
        for is_bad in bad:
            self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if is_bad else 0
            if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
                raise RuntimeError(
                    f"{self.nonfinite_in_a_row} non-finite rewards in a row (train.max_nonfinite_in_a_row="
                    f"{self.max_nonfinite_in_a_row}): the reward is broken or the policy diverged. "
                    f"Metrics so far are in {self.metrics_path}."
                )
        return {"reward_nonfinite": float(bad.sum())}

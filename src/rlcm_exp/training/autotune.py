"""`train.transitions_per_forward=auto`: the count of trained transitions per denoiser call that is
fastest on this machine, measured, within the memory model's budget.

The loss and its gradient are the same for every count (training/update.py), so the choice is one
of speed and memory only. Which is faster is not predictable: one large call keeps a GPU busy, but
on a CPU 20 calls of 8 images trained a tiny SD 1.15x faster per epoch than one call of 160, while
the toy model trained 2.1x faster with one call. So the first round of each process start times
the real update's forward + backward on its own first minibatch for each candidate count (1, 2,
4, ... and all, each dividing the transitions trained per trajectory, none over the memory cap),
without an optimizer step, the gradients and every RNG put back, and keeps the fastest per
transition. The choice is made on the main process and broadcast: every process makes the same
calls. It is not checkpointed: a resumed run measures again (the same loss either way; fp32
results agree to ~1e-6, not bit for bit, so a fixed-seed comparison states a fixed count).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from rlcm_exp.training.batching import BatchPlan
from rlcm_exp.training.checkpoint import rng_state, set_rng_state

AUTO = "auto"


def candidates(trained: int, cap: int | None) -> list[int]:
    """Counts to time: the powers of two that divide the `trained` transitions per trajectory, and
    `trained` itself (all in one call), none above `cap` (the memory model's largest; None: no cap)."""
    counts = {n for n in (2**i for i in range(trained.bit_length())) if trained % n == 0} | {trained}
    limit = trained if cap is None else max(1, cap)
    return sorted(n for n in counts if n <= limit)


def fastest(seconds_per_transition: Mapping[int, float]) -> int:
    """The count with the fewest seconds per trained transition; a tie goes to the smaller count
    (less memory)."""
    return min(sorted(seconds_per_transition), key=lambda n: seconds_per_transition[n])


class WarmupCall(Protocol):
    """An update that can run its forward + backward for one minibatch without stepping: `rows`
    trajectories, `steps` (rows, transitions) of them, `per_call` transitions stacked per call."""

    def warmup(
        self,
        ctx: Any,
        traj: Any,
        advantages: torch.Tensor,
        rows: torch.Tensor,
        steps: torch.Tensor,
        per_call: int,
    ) -> None: ...


@dataclass(frozen=True)
class Choice:
    count: int
    seconds_per_transition: dict[int, float]

    def describe(self, cap: int | None) -> str:
        table = ", ".join(f"{n}: {s * 1e3:.2f} ms" for n, s in sorted(self.seconds_per_transition.items()))
        limit = "no memory figure" if cap is None else f"memory model's cap {cap}"
        return (
            f"train.transitions_per_forward=auto picked {self.count} (measured per trained transition, "
            f"forward + backward of the first minibatch: {table}; {limit})"
        )


def _seconds(run: Callable[[], None], device: torch.device, repeats: int) -> float:
    """The least wall-clock of `repeats` runs of `run`, after one untimed run (allocation, kernels)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    update: WarmupCall,
    ctx: Any,
    traj: Any,
    advantages: torch.Tensor,
    counts: list[int],
    repeats: int = 1,
) -> Choice:
    """Time each count on the first minibatch's first max(counts) trained transitions (every count
    divides that many, so each does the same work); no optimizer step, gradients and RNGs restored."""
    plan: BatchPlan = ctx.plan
    bsz, width = plan.train_batch_size, max(counts)
    rows = torch.arange(bsz)
    steps = torch.arange(width).repeat(bsz, 1)  # the same transitions for every trajectory
    saved_grads = [p.grad for p in ctx.optimization.params]
    saved_rng = rng_state()
    try:
        per_transition: dict[int, float] = {}
        for n in counts:

            def run(n: int = n) -> None:
                update.warmup(ctx, traj, advantages, rows, steps, n)

            per_transition[n] = _seconds(run, ctx.accelerator.device, repeats) / width
    finally:
        for p, g in zip(ctx.optimization.params, saved_grads, strict=True):
            p.grad = g
        set_rng_state(saved_rng)
    return Choice(fastest(per_transition), per_transition)


def choose(
    update: Any, ctx: Any, traj: Any, advantages: torch.Tensor, cap: int | None
) -> tuple[BatchPlan, str]:
    """The plan with the fastest count (the main process's measurement, on every process) and the
    line that says so; an update without a `warmup` keeps the plan as it is."""
    plan: BatchPlan = ctx.plan
    counts = candidates(plan.trained_transitions, cap)
    if not hasattr(update, "warmup") or len(counts) == 1:
        why = "one candidate" if len(counts) == 1 else f"{type(update).__name__} has no warmup"
        return plan, f"train.transitions_per_forward=auto kept {plan.transitions_per_forward} ({why})"
    choice = measure(update, ctx, traj, advantages, counts)
    picked = [choice.count]
    if ctx.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        picked = broadcast_object_list(picked)
    return replace(plan, transitions_per_forward=int(picked[0])), choice.describe(cap)

"""Timing and memory of the production epoch, collected by a trainer callback.

The trainer runs unchanged. `BenchCallback.on_fit_start` wraps a few bound methods of the trainer's
own instances (policy, accelerator, optimizer, the trainer itself) with timers; each epoch is timed
between `on_epoch_start` and `on_epoch_end`, and after each measured epoch the compute floor
(floor.py) runs in the same process at the same batch sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import resource
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench.device import cuda_available, sync
from benchmarks.bench.floor import Floor
from rlcm_exp.training.callbacks import Callback


class PhaseClock:
    """Seconds per named phase, accumulated by wrapped callables.

    On a GPU a wrapped call records CUDA events instead of synchronising, so the instrumented
    epoch keeps its asynchrony; the events are resolved once, at the end of the epoch. Host-side
    phases (advantages, logging) are always wall-clock.
    """

    HOST = {"advantages", "logging"}

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, Any, Any]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        use_events = cuda_available() and name not in self.HOST

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if use_events:
                start_ev = torch.cuda.Event(enable_timing=True)
                start_ev.record()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - start
                if use_events:
                    end_ev = torch.cuda.Event(enable_timing=True)
                    end_ev.record()
                    self.events.append((name, start_ev, end_ev))

        return timed

    def wrap_attr(self, obj: Any, attr: str, name: str) -> None:
        """Time `obj.attr` as phase `name`: an instance attribute shadows the class's method, and the
        production code calls self.<attr>(...), so only this object is affected."""
        setattr(obj, attr, self.wrap(name, getattr(obj, attr)))

    def take(self) -> dict[str, float]:
        """This epoch's seconds per phase; resets the clock."""
        out = dict(self.wall)
        if self.events:
            sync()
            gpu: dict[str, float] = defaultdict(float)
            for name, s, e in self.events:
                gpu[name] += s.elapsed_time(e) / 1000.0
            out.update(gpu)
        self.wall, self.events = defaultdict(float), []
        return out


def reset_peak_memory() -> None:
    if cuda_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux >= 4.0: "5" resets VmHWM (peak RSS) of this process to its current RSS
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory() -> dict[str, Any]:
    if cuda_available():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"kind": "rss_peak", "bytes": int(line.split()[1]) * 1024}
    except OSError:
        pass
    # fallback: the process's lifetime peak (kB on Linux, bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "kind": "rss_peak_process",
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale,
    }


@contextmanager
def count_cuda_syncs(enabled: bool) -> Iterator[list[str] | None]:
    """On a GPU, the host-device synchronisations of the block (torch's sync debug mode), else None.

    Used on the warm-up epoch only: the check itself slows what it watches. A hot path with no
    synchronisation inside its step loops shows a count that grows with batches and optimizer
    steps, not with steps x minibatches.
    """
    if not (enabled and cuda_available()):
        yield None
        return
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower())


@dataclasses.dataclass
class Collected:
    """What one algorithm's run measured: per measured epoch its phases and its floor, once the FLOPs."""

    algo: str
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    floors: list[dict[str, float]] = dataclasses.field(default_factory=list)
    flops: dict[str, int] = dataclasses.field(default_factory=dict)
    batch_plan: dict[str, Any] = dataclasses.field(default_factory=dict)
    cuda_syncs_warmup_epoch: int | None = None
    checkpoint_s: float | None = None  # the final LoRA save
    checkpoints_s: list[float] = dataclasses.field(default_factory=list)  # full training-state checkpoints
    # the UNet call's batch in sampling and in training (classifier-free guidance doubles both for DDPO)
    unet_batches: dict[str, int] = dataclasses.field(default_factory=dict)
    # the training phase replayed with each transitions_per_forward value (`compare_update`)
    transitions_compare: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# (object on the trainer, its method, the phase it is timed as)
POLICY_PHASES = [
    ("encode_prompts", "text_encode"),
    ("sample", "sample_total"),
    ("decode", "vae_decode"),
    # the training forward: the trainer takes the action's mean from it (policy.log_prob calls it too)
    ("action_mean_std", "logprob_forward"),
]


def instrument(trainer: Any, clock: PhaseClock) -> None:
    """Wrap the trainer's collaborators' methods with the phase clock (instances only, nothing global)."""
    for attr, name in POLICY_PHASES:
        clock.wrap_attr(trainer.policy, attr, name)
    clock.wrap_attr(trainer.accelerator, "backward", "backward")
    clock.wrap_attr(trainer.accelerator, "clip_grad_norm_", "optimizer")
    for attr in ("step", "zero_grad"):
        clock.wrap_attr(trainer.optimizer, attr, "optimizer")
    # not lr_scheduler.step: its state_dict pickles the instance __dict__, wrapper included;
    # a LinearLR step is a few multiplications and lands in "other"
    clock.wrap_attr(trainer, "advantages", "advantages")
    clock.wrap_attr(trainer.metrics, "write", "logging")
    if trainer.logger is not None:
        clock.wrap_attr(trainer.logger, "log", "logging")
    save_grid = clock.wrap("logging", trainer.maybe_save_images)

    def first_grid_only(epoch: int, *args: Any, **kwargs: Any) -> Any:
        # the last epoch's grid is skipped: in a long run only the first and last of ~100 epochs
        # save one, so the measured epochs should not
        if epoch > 0 and epoch == trainer.settings.epochs - 1:
            return None
        return save_grid(epoch, *args, **kwargs)

    trainer.maybe_save_images = first_grid_only


def split_epoch(
    record: dict[str, Any], ph: dict[str, float], wall: float, plan: Any, reward_inline: bool
) -> dict[str, Any]:
    """One measured epoch as phases summing to its wall-clock ("other": the loop code between calls)."""
    sample_total = ph.get("sample_total", record["time_sample_s"])
    text, decode = ph.get("text_encode", 0.0), ph.get("vae_decode", 0.0)
    phases = {
        "text_encode": text,
        "sampling": max(sample_total - text - decode, 0.0),  # the UNet step loop
        "vae_decode": decode,
        "reward_wait": record.get("time_reward_wait_s", 0.0),  # reward not hidden behind sampling
        "advantages": ph.get("advantages", 0.0),
        "logprob_forward": ph.get("logprob_forward", 0.0),
        "backward": ph.get("backward", 0.0),
        "optimizer": ph.get("optimizer", 0.0),
        "logging": ph.get("logging", 0.0),
    }
    if reward_inline:  # reward_workers=0: scored inside the sampling loop's wall
        phases["reward_wait"] = record.get("time_reward_s", 0.0)
    # the remainder: loop code between the model calls (indexing, loss, tqdm, stats)
    phases["other"] = max(wall - sum(phases.values()), 0.0)
    return {
        "epoch_s": wall,
        "phases": phases,
        "reward_s": record.get("time_reward_s", 0.0),  # total scoring time, overlapped with sampling
        "sample_total_s": sample_total,
        "train_s": record.get("time_train_s", 0.0),
        "images_per_s": plan.samples_per_process / sample_total if sample_total > 0 else None,
        "rollout_s": sample_total / plan.sampling_batches,
    }


def memory_now() -> int:
    """Bytes in use now: allocated CUDA memory on a GPU, the process's RSS on a CPU."""
    if cuda_available():
        return int(torch.cuda.memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def compare_update(
    trainer: Any, update_args: tuple[Any, ...], values: list[int], repeats: int
) -> list[dict[str, Any]]:
    """The production `Trainer.update` on one recorded round, once per `transitions_per_forward` value
    (0 = all) and repeat, interleaved so that drift in the machine's speed hits every value alike.

    The trainer's plan is swapped for each call and restored afterwards; the LoRA weights do take
    the optimizer steps (the run is over, nothing reads them again)."""
    plan = trainer.plan
    rows: dict[int, dict[str, Any]] = {}
    try:
        for _ in range(repeats):
            for value in values:
                per_call = value or plan.trained_transitions
                trainer.plan = dataclasses.replace(plan, transitions_per_forward=per_call)
                gc.collect()
                before = memory_now()
                reset_peak_memory()
                sync()
                start = time.perf_counter()
                trainer.update(*update_args)
                sync()
                seconds = time.perf_counter() - start
                row = rows.setdefault(
                    value,
                    {
                        "transitions_per_forward": value,
                        "per_call": per_call,
                        "unet_training_calls": trainer.plan.unet_training_calls,
                        "seconds": [],
                        "memory_before_bytes": before,
                        "peak_memory": peak_memory(),
                    },
                )
                row["seconds"].append(seconds)
                peak = peak_memory()
                if peak["bytes"] > row["peak_memory"]["bytes"]:
                    row["peak_memory"] = peak
    finally:
        trainer.plan = plan
    return list(rows.values())


class FirstCallInfo:
    """The algorithm's loss, unchanged, remembering its first call's clipfrac (a tensor: no host sync)."""

    def __init__(self, loss: Any) -> None:
        self.loss, self.needs_log_ratio_totals = loss, loss.needs_log_ratio_totals
        self.first: Any = None

    def __call__(self, batch: Any) -> Any:
        loss, info = self.loss(batch)
        if self.first is None and "clipfrac" in info:
            self.first = info["clipfrac"].detach()
        return loss, info


class BenchCallback(Callback):
    """Times each epoch of `Trainer.fit` by phase; after each measured epoch, measures the floor.

    `compare_transitions` (values of train.transitions_per_forward, 0 = all): after the fit, the
    last round's update is replayed once per value and repeat (`compare_update`). `floor=False`
    skips the floor's timing (the FLOPs are still counted), as the GPU check does."""

    def __init__(
        self,
        collected: Collected,
        warmup: int,
        compare_transitions: list[int] | None = None,
        compare_repeats: int = 1,
        floor: bool = True,
    ) -> None:
        self.collected, self.warmup = collected, warmup
        self.compare, self.compare_repeats, self.measure_floor = (
            compare_transitions or [],
            compare_repeats,
            floor,
        )
        self.update_args: tuple[Any, ...] | None = None
        self.clock = PhaseClock()
        self.floor: Floor | None = None
        self._start = 0.0
        self._syncs = contextlib.ExitStack()
        self._found: list[str] | None = None
        self.first_loss: FirstCallInfo | None = None  # the algorithm's loss, wrapped at fit start

    def on_fit_start(self, trainer: Any) -> None:
        instrument(trainer, self.clock)
        self.first_loss = FirstCallInfo(trainer.algo.loss)
        trainer.algo.loss = self.first_loss
        self.collected.batch_plan = trainer.plan.as_dict()
        if self.compare:
            update = trainer.update

            def recording_update(*args: Any) -> Any:  # keeps the round for the replay in on_fit_end
                self.update_args = args
                return update(*args)

            trainer.update = recording_update

    def on_fit_end(self, trainer: Any) -> None:
        if self.compare and self.update_args is not None:
            self.collected.transitions_compare = compare_update(
                trainer, self.update_args, self.compare, self.compare_repeats
            )
            self.update_args = None
            self.clock.take()

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.clock.take()
        gc.collect()
        reset_peak_memory()
        sync()
        self._found = self._syncs.enter_context(count_cuda_syncs(enabled=epoch < self.warmup))
        if self.first_loss is not None:
            self.first_loss.first = None
        self._start = time.perf_counter()

    def on_epoch_end(self, trainer: Any, epoch: int, record: dict[str, Any]) -> None:
        sync()
        wall = time.perf_counter() - self._start
        self._syncs.close()
        if self._found is not None:
            self.collected.cuda_syncs_warmup_epoch = len(self._found)
        mem = peak_memory()
        phases = self.clock.take()
        measured = epoch >= self.warmup
        label = "measured" if measured else "warm-up"
        print(f"[bench] {self.collected.algo} epoch {epoch} ({label}): {wall:.2f} s", flush=True)
        if self.floor is None:
            self.floor = self._count_flops(trainer)
        if not measured:
            return
        reward_inline = trainer.settings.reward_workers == 0
        split = split_epoch(record, phases, wall, trainer.plan, reward_inline)
        self.collected.epochs.append({**split, "peak_memory": mem, "monitors": self._monitors(record)})
        if self.measure_floor:
            floor = self.floor.measure()
            print(f"[bench] {self.collected.algo} floor: {floor['total']:.2f} s", flush=True)
            self.collected.floors.append(floor)

    def _monitors(self, record: dict[str, Any]) -> dict[str, float | None]:
        """The round's correctness monitors: the first minibatch's ratios (1 in exact arithmetic; their
        largest deviation against the clip range), the round's clipfrac and the first loss call's."""
        first = None if self.first_loss is None else self.first_loss.first
        out: dict[str, float | None] = {
            k: record.get(k) for k in ("ratio_first", "ratio_first_max_dev", "clipfrac", "approx_kl")
        }
        out["clipfrac_first_call"] = None if first is None else float(first)
        return out

    def _count_flops(self, trainer: Any) -> Floor:
        """FLOPs of one UNet call of each kind, and the floor that times the epoch's own calls.

        Counted at one transition per training call (a stacked call is the same FLOPs per pair, and
        the GPU check's all-in-one call need not fit twice), then scaled to the epoch's call."""
        floor = Floor(trainer, per_call=1)
        self.collected.flops = floor.flops()
        per_call = trainer.plan.transitions_per_forward
        self.collected.flops["unet_train_call"] *= per_call
        self.collected.unet_batches = {
            "sample": floor.unet_sample_batch,
            "train": floor.unet_train_batch * per_call,
            "train_per_transition": floor.unet_train_batch,
        }
        return Floor(trainer) if self.measure_floor and per_call > 1 else floor

    def on_checkpoint(self, trainer: Any, folder: Path, seconds: float) -> None:
        if folder.name == "final":  # the LoRA weights written once, after the last epoch
            self.collected.checkpoint_s = seconds
        else:  # the full training state, every `checkpoint_every` epochs and at the end
            self.collected.checkpoints_s.append(seconds)

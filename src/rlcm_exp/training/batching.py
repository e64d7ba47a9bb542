"""Batch arithmetic, stated once: global sizes in the config, per-process sizes derived and checked.

Sizes that decide the algorithm (trajectories per epoch, per optimizer step) are global, so a run
means the same thing on 1 GPU or 8; sizes that decide memory (sampling and training chunks) are
per process. Every mismatch is refused before any model loads, naming the keys involved.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rlcm_exp.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    samples_per_epoch: int  # global trajectories sampled per epoch
    samples_per_process: int  # trajectories each process samples per epoch
    sampling_batches: int  # sampling forward chunks per process per epoch
    sample_batch_size: int  # per process
    train_batch_size: int  # per process minibatch
    minibatches_per_inner_epoch: int  # per process
    grad_accum_minibatches: int  # per process minibatches summed into one optimizer step
    samples_per_step: int  # global trajectories per optimizer step
    optimizer_steps_per_epoch: int
    transitions_per_trajectory: int  # T: stochastic transitions the policy records
    trained_transitions: int  # T_train = floor(T * timestep_fraction): trained per trajectory per inner epoch
    # T_window = ceil(T * timestep_window): the first (noisiest) transitions, the T_train are drawn from them
    eligible_transitions: int
    inner_epochs: int
    # trained transitions stacked into one UNet call (PER PROCESS memory knob: the training call's
    # batch is train_batch_size x this); the loss and its gradient are the same for every value
    transitions_per_forward: int = 1

    @property
    def unet_training_calls(self) -> int:
        """UNet forward+backward calls per process per epoch (a CFG call doubles its batch, not its count)."""
        calls_per_minibatch = self.trained_transitions // self.transitions_per_forward
        return self.inner_epochs * self.minibatches_per_inner_epoch * calls_per_minibatch

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"batch plan: {self.samples_per_epoch} trajectories/epoch over {self.world_size} process(es) "
            f"= {self.sampling_batches} x {self.sample_batch_size} per process; "
            f"{self.trained_transitions}/{self.transitions_per_trajectory} transitions trained per trajectory"
            + (
                f" (drawn from the first {self.eligible_transitions})"
                if self.eligible_transitions < self.transitions_per_trajectory
                else ""
            )
            + "; "
            f"{self.optimizer_steps_per_epoch} optimizer step(s)/epoch, each over {self.samples_per_step} "
            f"trajectories = {self.world_size} process(es) x {self.grad_accum_minibatches} minibatches x "
            f"{self.train_batch_size}; {self.inner_epochs} inner epoch(s); {self.unet_training_calls} UNet "
            f"training call(s)/epoch per process, each over {self.train_batch_size} x "
            f"{self.transitions_per_forward} (trajectory, transition) pairs"
        )


def plan_batches(
    *,
    world_size: int,
    samples_per_epoch: int,
    sample_batch_size: int,
    train_batch_size: int,
    samples_per_step: int,
    inner_epochs: int,
    transitions_per_trajectory: int,
    timestep_fraction: float,
    timestep_window: float = 1.0,
    transitions_per_forward: int = 1,
) -> BatchPlan:
    sizes = {
        "samples_per_epoch": samples_per_epoch,
        "sample_batch_size": sample_batch_size,
        "train_batch_size": train_batch_size,
        "samples_per_step": samples_per_step,
        "inner_epochs": inner_epochs,
    }
    _check_sizes(world_size, **sizes)
    trained, eligible = _trained_transitions(transitions_per_trajectory, timestep_fraction, timestep_window)
    per_call = trained if transitions_per_forward == 0 else transitions_per_forward
    _need(
        per_call >= 1 and trained % per_call == 0,
        f"train.transitions_per_forward={transitions_per_forward} must divide the {trained} transitions trained "
        f"per trajectory (or be 0: all of them in one call); valid: "
        f"{[d for d in range(1, trained + 1) if trained % d == 0]} or 0",
    )
    per_process = samples_per_epoch // world_size
    return BatchPlan(
        world_size=world_size,
        samples_per_epoch=samples_per_epoch,
        samples_per_process=per_process,
        sampling_batches=per_process // sample_batch_size,
        sample_batch_size=sample_batch_size,
        train_batch_size=train_batch_size,
        minibatches_per_inner_epoch=per_process // train_batch_size,
        grad_accum_minibatches=samples_per_step // (world_size * train_batch_size),
        samples_per_step=samples_per_step,
        optimizer_steps_per_epoch=inner_epochs * (samples_per_epoch // samples_per_step),
        transitions_per_trajectory=transitions_per_trajectory,
        trained_transitions=trained,
        eligible_transitions=eligible,
        inner_epochs=inner_epochs,
        transitions_per_forward=per_call,
    )


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_sizes(world_size: int, **sizes: int) -> None:
    """Every size (the train.* keys) positive, and each global size divisible as the plan needs."""
    for key, value in sizes.items():
        _need(value >= 1, f"train.{key}={value} must be a positive integer")
    samples_per_epoch, sample_batch_size = sizes["samples_per_epoch"], sizes["sample_batch_size"]
    train_batch_size, samples_per_step = sizes["train_batch_size"], sizes["samples_per_step"]
    _need(
        samples_per_epoch % world_size == 0,
        f"train.samples_per_epoch={samples_per_epoch} (global) is not divisible by the {world_size} processes; "
        f"use a multiple of {world_size}",
    )
    _need(
        (samples_per_epoch // world_size) % sample_batch_size == 0,
        f"train.samples_per_epoch={samples_per_epoch} gives {samples_per_epoch // world_size} trajectories per process, which "
        f"train.sample_batch_size={sample_batch_size} (per process) does not divide",
    )
    _need(
        (samples_per_epoch // world_size) % train_batch_size == 0,
        f"train.samples_per_epoch={samples_per_epoch} gives {samples_per_epoch // world_size} trajectories per process, which "
        f"train.train_batch_size={train_batch_size} (per process) does not divide",
    )
    _need(
        samples_per_step % (world_size * train_batch_size) == 0,
        f"train.samples_per_step={samples_per_step} (global) must be a multiple of {world_size} process(es) x "
        f"train.train_batch_size={train_batch_size} = {world_size * train_batch_size}",
    )
    _need(
        samples_per_epoch % samples_per_step == 0,
        f"train.samples_per_step={samples_per_step} (global) must divide train.samples_per_epoch="
        f"{samples_per_epoch}: an optimizer step may not straddle two sampling rounds",
    )


def _trained_transitions(
    transitions: int, timestep_fraction: float, timestep_window: float
) -> tuple[int, int]:
    """(T_train, T_window): transitions trained per trajectory, and the leading ones they are drawn from."""
    _need(
        0.0 < timestep_fraction <= 1.0,
        f"algo.timestep_fraction={timestep_fraction} must be in (0, 1]: the fraction of each trajectory's "
        "transitions trained per inner epoch",
    )
    _need(
        0.0 < timestep_window <= 1.0,
        f"algo.timestep_window={timestep_window} must be in (0, 1]: the leading (noisiest) fraction of each "
        "trajectory's transitions that may be trained; 1.0 = any of them, as in DDPO and RLCM",
    )
    trained = int(transitions * timestep_fraction)
    _need(
        trained >= 1,
        f"algo.timestep_fraction={timestep_fraction} x {transitions} transitions trains no "
        "transition; raise it or sampler.num_steps",
    )
    eligible = math.ceil(round(transitions * timestep_window, 6))
    _need(
        trained <= eligible,
        f"algo.timestep_fraction={timestep_fraction} trains {trained} of {transitions} transitions, "
        f"but algo.timestep_window={timestep_window} lets only the first {eligible} be trained; lower the "
        "fraction or widen the window",
    )
    return trained, eligible


def check_groups(group_size: int, sample_batch_size: int, train_batch_size: int, pairs: bool) -> None:
    """Group sampling (algo.group_size images per prompt): a group is drawn inside one sampling batch,
    so it never straddles two processes and the group statistics are the same for any process count;
    a pairwise loss (REBEL) also needs whole groups of an even size in every training minibatch."""
    _need(
        group_size >= 1, f"algo.group_size={group_size} must be a positive integer (1: one image per prompt)"
    )
    _need(
        sample_batch_size % group_size == 0,
        f"algo.group_size={group_size} must divide train.sample_batch_size={sample_batch_size} (PER PROCESS): "
        "each group of images of one prompt is sampled in one batch, on one process; valid group sizes: "
        f"{[d for d in range(1, sample_batch_size + 1) if sample_batch_size % d == 0]}",
    )
    if pairs:
        _need(
            group_size % 2 == 0 and train_batch_size % group_size == 0,
            f"algo.loss pairs trajectories of one prompt: algo.group_size={group_size} must be even and divide "
            f"train.train_batch_size={train_batch_size} (PER PROCESS), so that every minibatch holds whole pairs",
        )


def round_bytes(plan: BatchPlan, latent_elements: int, resolution: int) -> int:
    """Bytes one process holds for a round's trajectories (float32): each trajectory's T states and T
    next states, its final latent and its decoded image (3 x side x side). The conditioning, log-probs
    and rewards are small beside these and left out."""
    per_trajectory = (2 * plan.transitions_per_trajectory + 1) * latent_elements + 3 * resolution**2
    return 4 * plan.samples_per_process * per_trajectory


def check_round_fits(plan: BatchPlan, latent_elements: int, resolution: int, available: int) -> None:
    """Refuse, before the first round allocates it, a round whose trajectories alone need more than
    80% of the `available` bytes of the device that holds them: train.samples_per_epoch is bounded by
    the model (latent size, resolution, transitions), not by a fixed number."""
    need = round_bytes(plan, latent_elements, resolution)
    if need > 0.8 * available:
        per = need / plan.samples_per_process
        fits = max(1, int(0.8 * available / per)) * plan.world_size
        raise ConfigError(
            f"train.samples_per_epoch={plan.samples_per_epoch}: a round's trajectories need about "
            f"{need / 2**30:.1f} GiB per process ({plan.transitions_per_trajectory} transitions of "
            f"{latent_elements} latent values and a {resolution} px image each), but the device has "
            f"{available / 2**30:.1f} GiB free; at most about {fits} fit"
        )

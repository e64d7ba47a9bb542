"""The settings objects the config groups map to: `train` -> TrainSettings, `algo` -> AlgoSettings,
`memory` -> MemorySettings, `algo.lr_schedule` -> a schedule builder. Each is built by `instantiate`
from its group; the composition root (training/build.py) wires them, nothing else reads `cfg`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.lora import LoraSettings
from rlcm_exp.policies.base import Policy
from rlcm_exp.rl.objective import Loss, PPOLoss
from rlcm_exp.rl.ppo import PPOSettings
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker, per_prompt_advantages
from rlcm_exp.training.update import PolicyGradientUpdate, Update

LRScheduleBuilder = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class TrainSettings:
    epochs: int = 100  # sampling rounds
    samples_per_epoch: int = 320  # GLOBAL trajectories sampled per epoch (all processes)
    sample_batch_size: int = 8  # PER PROCESS trajectories per sampling forward
    train_batch_size: int = 2  # PER PROCESS trajectories per training minibatch
    samples_per_step: int = 32  # GLOBAL trajectories per optimizer step
    # PER PROCESS trained transitions per UNet call (0: all; "auto": the fastest that fits, measured on
    # the first round, training/autotune.py); the same gradient for every value
    transitions_per_forward: int | str = 1
    inner_epochs: int = 1  # passes over each round's samples
    max_grad_norm: float = 5.0  # clip of the LoRA gradient norm
    save_images: int = 16  # images of the first and last epoch saved as a grid (0: none)
    save_images_every: int = 0  # also save a grid every N epochs (0: only first and last)
    reward_workers: int = 1  # threads scoring rewards while the next batch samples (0: score inline)
    # longest one reward call may take, seconds (training and held-out evaluation): past it the run
    # stops with a one-line error (checkpointing the last finished epoch); null: no bound
    reward_timeout_s: float | None = 3600.0
    max_nonfinite_in_a_row: int = 64  # stop when this many consecutive rewards are NaN/inf
    reward_server_gpus: int = 0  # GPUs of a remote reward server, counted in gpu_hours
    checkpoint_every: int = (
        10  # full checkpoint every N epochs (and at the end, and on SIGTERM/SIGUSR1/SIGUSR2)
    )
    keep_last: int = 3  # complete checkpoints kept (older ones deleted)
    dump_rollouts: bool = (
        False  # save each process's prompts, rewards, advantages per epoch to RUN_DIR/rollouts
    )
    # held-out evaluation before training, every N epochs and after the last (0: never); the config's
    # default is N = train.epochs: before and after only
    eval_every: int = 0
    eval_seeds: int = 2  # seeds per held-out prompt (seed i is the same across evaluations)
    # GLOBAL training wall-clock budget in seconds (metrics' wallclock_s, evaluations excluded): the
    # run ends after the first epoch that reaches it, or after `epochs`, whichever comes first
    max_wallclock_s: float | None = None
    # EMA of the trained LoRA weights: shadow <- decay * shadow + (1 - decay) * theta after every
    # optimizer step (GLOBAL: the same weights on every process); null: off. Saved in checkpoints,
    # written as checkpoints/final_ema at the end
    ema_decay: float | None = None
    eval_ema: bool = True  # with ema_decay set, held-out evaluations during training use the EMA weights


@dataclass
class AlgoSettings:
    """What distinguishes one algorithm from another: numbers and small objects, never a code path."""

    name: str  # label for logs, sweep folders and reports; nothing branches on it
    lr_schedule: LRScheduleBuilder  # (optimizer, total optimizer steps) -> LR scheduler
    ppo: PPOSettings
    lora: LoraSettings
    # per-prompt advantage normaliser (fresh per run), read by per_prompt_advantages only: algorithms
    # with group advantages (grpo, rebel) leave it out of their config and get this unused, empty one
    # (checkpointed all the same)
    stat_tracker: PerPromptStatTracker = field(default_factory=lambda: PerPromptStatTracker(16, 16))
    timestep_fraction: float = 1.0  # fraction of each trajectory's transitions trained per inner epoch
    timestep_window: float = 1.0  # trained transitions come from the first ceil(T * this)
    group_size: int = 1  # k images per prompt per round, each with its own noise (1: a prompt per image)
    # (rewards, prompts, group ids, tracker) -> advantages of the gathered round (finite rewards only)
    advantage: Callable[..., Any] = per_prompt_advantages
    loss: Loss = field(default_factory=PPOLoss)  # the per-UNet-call policy loss (rl/objective.py)
    kl_coef: float = 0.0  # weight of the per-transition KL to the base model in the loss (0: none, the paper)
    # the algorithm's second half: (context, epoch, trajectories, advantages) -> metrics (training/update.py)
    update: Update = field(default_factory=PolicyGradientUpdate)
    # auto | true | false: old log-probs recomputed in the training calls' layout and precision before
    # a round's first step (PolicyGradientUpdate; auto: under fp16/bf16 only)
    recompute_old_log_probs: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.recompute_old_log_probs not in (True, False, "auto"):
            raise ConfigError(
                f"algo.recompute_old_log_probs={self.recompute_old_log_probs!r}: use auto | true | false"
            )


@dataclass
class MemorySettings:
    """Speed/memory switches on the policy's denoiser; each is off by default and changes no result."""

    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile_unet: bool = False

    def apply(self, policy: Policy) -> None:
        if self.gradient_checkpointing:
            policy.denoiser.enable_gradient_checkpointing()
            # diffusers only checkpoints in training mode; the denoiser has no dropout to switch on
            policy.denoiser.train()
        if self.channels_last:
            policy.denoiser.to(memory_format=torch.channels_last)
        if self.compile_unet:
            policy.denoiser = torch.compile(policy.denoiser)


def linear_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, start_factor: float = 1.0, end_factor: float = 1.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """LR x start_factor at the first optimizer step, falling linearly to LR x end_factor at the last
    (RLCM: 1 -> 2/3; DDPO: constant, end_factor 1)."""
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=start_factor, end_factor=end_factor, total_iters=max(total_steps, 1)
    )


def cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, end_factor: float = 0.0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay from LR to LR x end_factor over the run's optimizer steps."""

    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

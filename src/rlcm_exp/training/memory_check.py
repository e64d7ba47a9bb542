"""The run's training call against the device's free memory, before any model loads.

The config states the call (train batch, transitions per call, guidance, resolution, checkpointing,
precision); the family's `memory:` figures (conf/model/*.yaml, rlcm_exp/models/memory.py) turn it
into an estimate. A family without figures (the tiny and toy ones, a user's own) is not estimated.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.memory import (
    HEADROOM,
    MemoryProfile,
    TrainingCall,
    free_memory,
    largest_transitions,
    refusal,
)


def stated_transitions(train: Any) -> int:
    """train.transitions_per_forward as the first calls use it: "auto" starts at 1 (training/autotune.py)."""
    value = train.get("transitions_per_forward", 1)
    return 1 if value == "auto" else int(value)


def training_call(
    cfg: DictConfig, family: Any, member: str, mixed_precision: str
) -> tuple[MemoryProfile, TrainingCall, int] | None:
    """(the family's figures, the call the config states, transitions trained per trajectory), or
    None without figures. Before the policy exists the transitions per trajectory are bounded by
    sampler.num_steps: train.transitions_per_forward=0 ("all") is estimated at that bound, "auto" at
    1 (its smallest candidate: the others are capped by `transitions_cap`)."""
    profile: MemoryProfile | None = getattr(family, "memory", None)
    if profile is None:
        return None
    sampler, train = cfg.sampler, cfg.train
    trained = max(1, int(sampler.num_steps * cfg.algo.get("timestep_fraction", 1.0)))
    per_call = stated_transitions(train) or trained
    guidance = sampler.get("guidance_scale") or 1.0
    doubled = guidance > 1 and sampler.get("train_cfg", True) and member not in profile.guidance_embedding
    resolution = sampler.get("resolution") or family.member(member).resolution or profile.reference_resolution
    call = TrainingCall(
        train_batch_size=train.train_batch_size,
        transitions=per_call,
        cfg_doubled=bool(doubled),
        resolution=int(resolution),
        checkpointing=bool(cfg.memory.gradient_checkpointing),
        weight_bytes=4 if cfg.model.get("dtype") in (None, "float32") else 2,
        autocast_16bit=mixed_precision in ("fp16", "bf16"),
    )
    return profile, call, trained


def check_training_memory(
    cfg: DictConfig, family: Any, member: str, mixed_precision: str, device: torch.device
) -> None:
    """Refuse, in one line naming the knob to change, a training call whose estimate does not fit
    the free memory of `device` (models/memory.py: HEADROOM of it)."""
    stated = training_call(cfg, family, member, mixed_precision)
    if stated is None:
        return
    why = refusal(*stated[:2], free_memory(device), stated[2])
    if why is not None:
        raise ConfigError(f"model={family.name}: {why}")


def transitions_cap(
    cfg: DictConfig, family: Any, member: str, mixed_precision: str, device: torch.device
) -> int | None:
    """The most transitions per call that fit the free memory of `device` (train.transitions_per_forward
    =auto times none above it), or None for a family without memory figures."""
    stated = training_call(cfg, family, member, mixed_precision)
    if stated is None:
        return None
    profile, call, trained = stated
    return max(1, largest_transitions(profile, call, HEADROOM * free_memory(device), trained))

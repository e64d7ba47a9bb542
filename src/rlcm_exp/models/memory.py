"""A memory model of one training call of the denoiser: an ESTIMATE, until a GPU measures it.

What it counts, per training process:
- the frozen weights the process loads (denoiser, text encoders, VAE): `frozen_params_b` billion
  parameters x 2 bytes (model.dtype float16 / bfloat16) or 4 (float32);
- the activations saved for the backward of one denoiser call: images per call (train batch x
  transitions per call x 2 under classifier-free batch doubling) x GiB per image at the family's
  reference resolution, scaled by the latent area ((side / reference side)^2), x 2 without 16-bit
  autocast; with gradient checkpointing the checkpointed figure instead.

What it leaves out: the LoRA and its optimizer state (tens of MB), the reward model, the round's
trajectories (training/batching.round_bytes checks those), the sampling calls (no gradient: far
below a training call), CUDA's context and the allocator's fragmentation: the refusal keeps
`HEADROOM` of the free memory for them.

The per-image figures of the shipped families (conf/model/*.yaml, `memory:`) were measured on meta
tensors (shapes only, no GPU): the bytes saved for backward by a LoRA'd fp16 UNet at batch 1, the
attention-probability matrices left out (PyTorch SDPA's flash and memory-efficient kernels do not
keep them), frozen weights left out; the checkpointed figure adds the largest single block's saved
bytes (recomputed in backward) to what checkpointing keeps. `make gpu-check` rows measure the peak.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

GIB = 2**30
HEADROOM = 0.9  # a call may use this fraction of the free memory: the rest for what the model leaves out


@dataclass(frozen=True)
class MemoryProfile:
    """A family's memory figures (conf/model/FAMILY.yaml `memory:`); an estimate, see the module."""

    frozen_params_b: (
        float  # frozen parameters one training process loads (denoiser, text encoders, VAE), billions
    )
    reference_resolution: int  # px: the side at which the per-image activation figures hold
    activation_gib: float | None = (
        None  # GiB saved for backward per image per call (16-bit autocast); None: unknown
    )
    checkpointed_activation_gib: float | None = None  # the same with memory.gradient_checkpointing=true
    # members whose guidance is an embedding input, not classifier-free batch doubling (LCM-Dreamshaper's lcm)
    guidance_embedding: Sequence[str] = ()


@dataclass(frozen=True)
class TrainingCall:
    """The shape of one training call of the denoiser, as the config states it."""

    train_batch_size: int  # trajectories per minibatch (per process)
    transitions: int  # trained transitions stacked into the call (train.transitions_per_forward, resolved)
    cfg_doubled: bool  # classifier-free guidance doubles the call's batch
    resolution: int  # image side in px
    checkpointing: bool  # memory.gradient_checkpointing
    weight_bytes: int  # bytes per frozen parameter: 2 (float16, bfloat16) or 4 (float32)
    autocast_16bit: bool  # mixed_precision fp16 / bf16: activations in 2 bytes, else 4

    @property
    def images(self) -> int:
        return self.train_batch_size * self.transitions * (2 if self.cfg_doubled else 1)


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float  # bytes of frozen weights
    activations: float | None  # bytes saved for backward by one call; None: the family has no figure

    @property
    def total(self) -> float:
        return self.weights + (self.activations or 0.0)

    def describe(self) -> str:
        acts = (
            "no activation figure"
            if self.activations is None
            else f"activations {self.activations / GIB:.1f}"
        )
        return f"about {self.total / GIB:.1f} GiB (frozen weights {self.weights / GIB:.1f} + {acts})"


def estimate(profile: MemoryProfile, call: TrainingCall) -> MemoryEstimate:
    """Bytes of one training call: frozen weights + saved activations (module docstring)."""
    weights = profile.frozen_params_b * 1e9 * call.weight_bytes
    per_image = profile.checkpointed_activation_gib if call.checkpointing else profile.activation_gib
    if per_image is None:
        return MemoryEstimate(weights, None)
    area = (call.resolution / profile.reference_resolution) ** 2
    precision = 1 if call.autocast_16bit else 2
    return MemoryEstimate(weights, call.images * per_image * GIB * area * precision)


def _fits(profile: MemoryProfile, call: TrainingCall, budget: float) -> bool:
    return estimate(profile, call).total <= budget


def largest_transitions(profile: MemoryProfile, call: TrainingCall, budget: float, trained: int) -> int:
    """The most trained transitions per call (at most `trained`) whose estimate fits `budget` bytes;
    0 when not even one does (train.transitions_per_forward=auto's cap)."""
    return max(
        (n for n in range(1, trained + 1) if _fits(profile, replace(call, transitions=n), budget)), default=0
    )


def knob(profile: MemoryProfile, call: TrainingCall, budget: float, trained: int) -> str:
    """The first change that brings the call within `budget` bytes, those that change no result first:
    fewer transitions per call (a divisor of the `trained` transitions per trajectory), gradient
    checkpointing, a smaller train batch (gradient accumulation keeps the step), then 16-bit weights."""
    for n in sorted((d for d in range(1, call.transitions) if trained % d == 0), reverse=True):
        if _fits(profile, replace(call, transitions=n), budget):
            return f"set train.transitions_per_forward={n}"
    one = replace(call, transitions=1, checkpointing=True)
    also = " and train.transitions_per_forward=1" if call.transitions > 1 else ""
    if not call.checkpointing and _fits(profile, one, budget):
        return "set memory.gradient_checkpointing=true" + also
    for b in range(call.train_batch_size - 1, 0, -1):
        if _fits(profile, replace(one, train_batch_size=b), budget):
            return f"set train.train_batch_size={b} with memory.gradient_checkpointing=true" + also
    if call.weight_bytes > 2 and _fits(profile, replace(one, train_batch_size=1, weight_bytes=2), budget):
        return (
            "set model.dtype=float16 (bfloat16 with mixed_precision=bf16), memory.gradient_checkpointing=true"
        )
    return (
        "even one image per call, checkpointed, with 16-bit weights does not fit: use a GPU with more memory"
    )


def refusal(profile: MemoryProfile, call: TrainingCall, available: float, trained: int) -> str | None:
    """None when the call's estimate fits `HEADROOM` of `available` bytes, else why and what to change."""
    need = estimate(profile, call)
    budget = HEADROOM * available
    if need.total <= budget:
        return None
    return (
        f"a training call of {call.images} images at {call.resolution} px needs {need.describe()}, an estimate "
        f"(rlcm_exp/models/memory.py), over {HEADROOM:.0%} of the {available / GIB:.1f} GiB free: "
        + knob(profile, call, budget, trained)
    )

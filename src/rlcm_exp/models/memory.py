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
from typing import Any

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


# ---------------------------------------------------------------------------- a VLM reward (LLaVA)


def transformer_params(
    hidden: int, layers: int, intermediate: int, vocab: int, gated: bool, head: bool
) -> float:
    """Parameters of a transformer stack, biases and norms left out: per layer 4 h^2 (attention) +
    (3 if gated (SwiGLU) else 2) x h x intermediate (MLP); + vocab x h embeddings (x 2 with an untied
    LM head)."""
    per_layer = 4 * hidden**2 + (3 if gated else 2) * hidden * intermediate
    return layers * per_layer + vocab * hidden * (2 if head else 1)


@dataclass(frozen=True)
class VlmCall:
    """One greedy `generate` call of a VLM reward, as the reward config states it."""

    params_b: float  # VLM parameters, billions (vision tower, projector, language model)
    layers: int  # language-model layers, each holding a key and a value cache
    kv_width: int  # key (= value) values per token per layer: kv heads x head dim
    prompt_tokens: int  # image tokens + question tokens
    new_tokens: int  # reward.max_new_tokens
    batch: int  # reward.batch_size: images per call
    weight_bytes: int  # reward.dtype: 2 (float16, bfloat16) or 4 (float32); the cache has the same
    other_b: float = 0.0  # parameters of the models loaded beside it, billions, in float32 (BERTScore)

    def estimate(self) -> MemoryEstimate:
        """Weights (the VLM at weight_bytes, the others at 4) + the KV cache of the longest answer:
        2 x layers x kv_width x (prompt + new tokens) x batch x weight_bytes."""
        weights = self.params_b * 1e9 * self.weight_bytes + self.other_b * 1e9 * 4
        tokens = self.prompt_tokens + self.new_tokens
        return MemoryEstimate(
            weights, 2 * self.layers * self.kv_width * tokens * self.batch * self.weight_bytes
        )


def _vlm_batch(call: VlmCall, budget: float) -> int:
    """The most images per call (at most `call.batch`) that fit `budget` bytes; 0 when none does."""
    one = replace(call, batch=1).estimate()
    assert one.activations is not None
    return max(0, min(call.batch, int((budget - one.weights) // one.activations)))


def vlm_knob(call: VlmCall, budget: float) -> str:
    """The first change that brings the VLM within `budget` bytes: a smaller batch (same answers),
    then 16-bit weights (and the batch that then fits), else a larger device."""
    b = _vlm_batch(call, budget)
    if b >= 1:
        return f"set reward.batch_size={b}"
    if call.weight_bytes > 2:
        b = _vlm_batch(replace(call, weight_bytes=2), budget)
        if b >= 1:
            return "set reward.dtype=float16" + ("" if b == call.batch else f" and reward.batch_size={b}")
    return "even one image with 16-bit weights does not fit: serve the reward on a larger GPU (rlcm_exp.reward_server)"


def vlm_refusal(call: VlmCall, available: float) -> str | None:
    """None when the VLM reward's estimate fits `HEADROOM` of `available` bytes, else why and the knob."""
    need = call.estimate()
    budget = HEADROOM * available
    if need.total <= budget:
        return None
    assert need.activations is not None
    return (
        f"the VLM reward needs about {need.total / GIB:.1f} GiB (weights {need.weights / GIB:.1f} + KV cache "
        f"{need.activations / GIB:.1f} for {call.batch} images x {call.prompt_tokens + call.new_tokens} tokens), "
        f"an estimate (rlcm_exp/models/memory.py), over {HEADROOM:.0%} of the {available / GIB:.1f} GiB free: "
        + vlm_knob(call, budget)
    )


def free_memory(device: Any) -> int:
    """Free bytes of `device`: CUDA's own count, or the host's available memory for a CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)

"""The policy interface: what the trainer, the evaluation and the benchmarks may use of a sampler.

A policy is a denoiser (the family's network: a UNet today, a transformer for flow families) plus a
per-step Gaussian: a sampler seen as a Gaussian policy over latent transitions (RLCM sec. 4, DDPO
sec. 4.2). Its conditioning is an opaque row-indexable record (conditioning.py) that the family
defines.
LCMPolicy (lcm.py), DDIMPolicy (ddim.py) and FlowPolicy (flow.py: Flow-SDE, CPS and the consistency
re-noise on rectified flow) satisfy it structurally; nothing inherits from it. `log_prob` and
`action_mean_std` take the trained transition's index (0..T-1); a policy whose trained steps are
not its first T (flow.py's sampler.stochastic_steps) maps it to its step.
Code outside `rlcm_exp.policies` uses only these members: no private attribute, no isinstance fork
on a concrete policy class.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from rlcm_exp.policies.conditioning import Conditioning
from rlcm_exp.policies.trajectory import Trajectory

Generators = torch.Generator | list[torch.Generator] | None
DenoiserInputs = tuple[torch.Tensor, torch.Tensor, dict[str, Any]]


@runtime_checkable
class Policy(Protocol):
    """What the trainer, evaluation and benchmarks use of a policy; LCMPolicy (lcm.py) and DDIMPolicy
    (ddim.py) repeat these signatures on purpose."""

    # The modules. `denoiser` (the family's network: UNet or transformer) carries the LoRA parameters
    # and may be replaced by a wrapped module (DDP, torch.compile), so it is typed loosely, as
    # diffusers' own modules are.
    denoiser: Any
    vae: Any
    tokenizer: Any
    member: str  # the model family's member it drives: "lcm" (the few-step member) or "diffusion"

    resolution: int  # image side in pixels
    vae_scale: int  # pixels per latent cell: the latent side is resolution // vae_scale
    latent_channels: int
    num_steps: int  # H: denoiser calls (sampler steps) per image
    timesteps: torch.Tensor  # (H,) CPU: the scheduler timestep of each step (long; flow: float, 1000 s)

    @property
    def num_transitions(self) -> int:
        """T: trained (stochastic) transitions per trajectory."""
        ...

    @property
    def device(self) -> torch.device: ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """The prompts' conditioning record, one row per prompt (no grad)."""
        ...

    def sample(self, prompts: list[str], generator: Generators) -> Trajectory:
        """A batch of rollouts, no grad: all H steps, every trained transition recorded."""
        ...

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: torch.Tensor,
        cond: Conditioning,
    ) -> torch.Tensor:
        """(B,) float32 log pi_theta(next | latents) at per-sample transition indices (B,), with grad."""
        ...

    def action_mean_std(
        self, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian action's float32 mean (B, C, h, w), with grad, and its theta-independent std
        (broadcastable): `log_prob` is gaussian_log_prob(next_latents, mean, std) of exactly these."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 images in [0, 1]."""
        ...

    def estimates(self, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
        """After each of the H sampler steps, the current estimate of the clean latent (what decoding
        would show if sampling stopped there). Draws the same random numbers in the same order as
        `sample`, so the last estimate decodes to `sample`'s images. The inference-budget
        evaluation stops iterating when the budget is spent."""
        ...

    def denoiser_inputs(
        self,
        latents: torch.Tensor,
        step_index: torch.Tensor | int,
        cond: Conditioning,
        training: bool,
    ) -> DenoiserInputs:
        """The exact (x, t, kwargs) of the one denoiser call of step `step_index` at state `latents`:
        `denoiser(x, t, **kwargs)` (a UNet) or `denoiser(hidden_states=x, timestep=t, **kwargs)` (an
        SD3 / FLUX transformer: x packed for FLUX) is what `sample` (training=False) or `log_prob`
        (training=True) calls, classifier-free doubling and guidance embedding included."""
        ...

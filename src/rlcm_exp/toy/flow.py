"""Rectified flow for the toy flow world: the interpolation, the estimates from one velocity, and the
two small samplers that measure the toy flow pair (`rlcm_exp.toy.flow_scoring`).

Conventions (SD3, FLUX; diffusers' FlowMatchEulerDiscreteScheduler): x_s = (1 - s) x0 + s eps with
s in [0, 1] (s = 1 is pure noise); the network predicts a velocity v ~ eps - x0, so one call gives
x0_hat = x_s - s v and eps_hat = x_s + (1 - s) v; the Euler step of the ODE to s' < s is
x_s' = x_s + (s' - s) v. The UNet is conditioned on the timestep t = 1000 s, as the scheduler's
`timesteps` are.

`teacher_sample` (FlowMatchEulerDiscreteScheduler's own Euler steps, classifier-free guidance) and
`student_sample` (the multistep consistency sampler: x0_hat re-noised with fresh noise to the next s,
the last step deterministic) are the quality table's samplers only: the RL policies' flow samplers
(rlcm_exp.policies, `sampler=flow_sde | cps | flow_consistency`) replace them there.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel

NUM_TRAIN_TIMESTEPS = 1000  # the UNet's timestep is t = 1000 s, as the scheduler's timesteps are
# FlowMatchEulerDiscreteScheduler's settings for both members: no timestep shift at 8x8 latents
# (SD3 shifts by 3 at 128x128 latents; the shift moves the grid of s, not the step).
SCHEDULER_CONFIG = {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "shift": 1.0}


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler saved beside both members, so each loads like a real flow pipeline."""
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def _col(s: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (B,) value broadcast over `like`'s (B, C, H, W)."""
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device)
    return s.view(-1, *([1] * (like.dim() - 1))) if s.dim() else s


def interpolate(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """x_s = (1 - s) x0 + s eps."""
    s = _col(s, x0)
    return (1 - s) * x0 + s * eps


def x0_from_velocity(x_s: torch.Tensor, s: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_s - s v."""
    return x_s - _col(s, x_s) * v


def eps_from_velocity(x_s: torch.Tensor, s: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """eps_hat = x_s + (1 - s) v."""
    return x_s + (1 - _col(s, x_s)) * v


def euler_step(
    x_s: torch.Tensor, s: torch.Tensor | float, s_next: torch.Tensor | float, v: torch.Tensor
) -> torch.Tensor:
    """x_s' = x_s + (s' - s) v: one Euler step of the flow ODE."""
    return x_s + (_col(s_next, x_s) - _col(s, x_s)) * v


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance on the velocity: v_u + g (v_c - v_u) (g = 1: no guidance)."""
    return v_uncond + _col(scale, v_cond) * (v_cond - v_uncond)


def consistency_grid(steps: int) -> list[float]:
    """The student's noise levels for `steps` calls: 1, 1 - 1/n, ..., 1/n (each on the distillation
    grid when n divides its size, see rlcm_exp.toy.flow_stages.CD_GRID)."""
    return [1.0 - k / steps for k in range(steps)]


@torch.no_grad()
def teacher_sample(
    unet: UNet2DConditionModel,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Latents from `noise` by the scheduler's Euler steps with CFG (cond, uncond: (B, L, D) states)."""
    scheduler = flow_scheduler()
    scheduler.set_timesteps(steps)
    x = noise
    states = torch.cat([cond, uncond])
    for t in scheduler.timesteps:
        v_c, v_u = unet(torch.cat([x, x]), t.expand(2 * len(x)), states).sample.chunk(2)
        x = scheduler.step(guided(v_c, v_u, guidance_scale), t, x).prev_sample
    return x


@torch.no_grad()
def student_sample(
    unet: UNet2DConditionModel,
    cond: torch.Tensor,
    w_embedding: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    gen: torch.Generator,
) -> torch.Tensor:
    """Latents from `noise` by the multistep consistency sampler: at each s of `consistency_grid`,
    x0_hat = x_s - s v from one call (guidance is the student's embedding, no second call); every
    step but the last re-noises it with fresh noise to the next s, the last returns x0_hat."""
    grid = consistency_grid(steps)
    x = noise
    x0_hat = noise
    for k, s in enumerate(grid):
        t = torch.full((len(x),), s * NUM_TRAIN_TIMESTEPS)
        x0_hat = x0_from_velocity(x, s, unet(x, t, cond, timestep_cond=w_embedding).sample)
        if k + 1 < len(grid):
            fresh = torch.randn(x.shape, generator=gen)
            x = interpolate(x0_hat, fresh, grid[k + 1])
    return x0_hat

"""The toy flow recipe's training stages: a rectified-flow teacher UNet, and a few-step student
distilled from it by consistency distillation along the flow ODE.

Both reuse the toy world's frozen VAE latents and frozen text encoder (their caption states are
computed once: `states[0]` is "", `states[i]` the i-th training prompt), the stages' common loop
(`rlcm_exp.toy.stages.optimize`) and its EMA helpers. `rlcm_exp.toy.flow_runner.run_flow` calls them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from rlcm_exp.toy.build import guidance_embedding
from rlcm_exp.toy.captions import noisy_caption_index
from rlcm_exp.toy.flow import NUM_TRAIN_TIMESTEPS, euler_step, guided, interpolate, x0_from_velocity
from rlcm_exp.toy.stages import (
    CAPTION_DROPOUT,
    LCD_TARGET_EMA,
    LCD_W_MAX,
    LCD_W_MIN,
    Budget,
    ema_decay,
    ema_update,
    lcm_student,
    optimize,
    posterior_sample,
    schedule_record,
)

# Consistency distillation walks a uniform grid of CD_GRID noise levels s = n / CD_GRID, one teacher
# Euler step (1 / CD_GRID) per distillation step; 48 is divisible by 1, 2, 3, 4, 6, 8, 12 and 16, so
# the student's n-step samplers (s = 1 - k / n) stay on the grid it was trained on.
CD_GRID = 48


@dataclass(frozen=True)
class FlowSchedule:
    """Step budget of one toy flow run. `full` makes the committed weights; `tiny` checks the plumbing."""

    n_latents: int  # training images encoded once by the frozen VAE
    teacher: Budget  # the rectified-flow teacher (velocity prediction)
    cd: Budget  # consistency distillation of the student
    eval_n: int  # images per split in the quick evaluation after each stage
    quality_n: int  # images per split and setting in the final quality table

    def as_record(self) -> dict:
        """Flat {n_latents, teacher_steps, teacher_batch, ...}, as recipe.json records it."""
        return schedule_record(self)


FLOW_SCHEDULES: dict[str, FlowSchedule] = {
    "full": FlowSchedule(
        n_latents=8192,
        teacher=Budget(steps=700, batch=64, lr=5e-4),
        cd=Budget(steps=500, batch=32, lr=2e-4),
        eval_n=32,
        quality_n=128,
    ),
    "tiny": FlowSchedule(
        n_latents=64, teacher=Budget(3, 8, 1e-3), cd=Budget(3, 8, 1e-4), eval_n=4, quality_n=4
    ),
}


def train_flow_teacher(
    unet: UNet2DConditionModel,
    states: torch.Tensor,
    latents: tuple[torch.Tensor, torch.Tensor],
    cap_idx: torch.Tensor,
    attrs: torch.Tensor,
    scaling_factor: float,
    budget: Budget,
    gen: torch.Generator,
    caption_noise: float,
) -> tuple[UNet2DConditionModel, list[float]]:
    """Rectified flow (conditional flow matching): s ~ U(0, 1), x_s = (1 - s) x0 + s eps, the UNet
    regressed on v = eps - x0 (Liu et al. 2022, arXiv 2209.03003; Lipman et al. 2022, arXiv
    2210.02747). Caption noise and 10% caption dropout to "" as the diffusion teacher's recipe;
    returns the EMA copy of the UNet and the per-step velocity MSE."""
    opt = torch.optim.AdamW(unet.parameters(), lr=budget.lr, weight_decay=1e-2)
    ema = copy.deepcopy(unet).requires_grad_(False)
    bsz = budget.batch

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.randint(0, len(cap_idx), (bsz,), generator=gen)
        x0 = posterior_sample(latents, b, scaling_factor, gen)
        which = (
            cap_idx[b].clone() if caption_noise == 0 else noisy_caption_index(attrs[b], caption_noise, gen)
        )
        which[torch.rand(bsz, generator=gen) < CAPTION_DROPOUT] = 0
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.rand(bsz, generator=gen)
        pred = unet(interpolate(x0, eps, s), s * NUM_TRAIN_TIMESTEPS, states[which]).sample
        loss = F.mse_loss(pred, eps - x0)
        return loss, loss

    def after_step(step: int) -> None:
        ema_update(ema, unet, ema_decay(step, 0.999))

    losses = optimize(
        "flow teacher", budget, opt, unet.parameters(), 200, loss_fn, after_step, ("v_mse", ".4f")
    )
    return ema, losses


def consistency_x0(
    unet: UNet2DConditionModel, x_s: torch.Tensor, s: torch.Tensor, states: torch.Tensor, w_emb: torch.Tensor
) -> torch.Tensor:
    """The student's consistency function f(x_s, s) = x_s - s v(x_s, s): its x0 estimate, which meets
    the boundary condition f(x_0, 0) = x_0 by construction (no c_skip / c_out needed)."""
    v = unet(x_s, s * NUM_TRAIN_TIMESTEPS, states, timestep_cond=w_emb).sample
    return x0_from_velocity(x_s, s, v)


def distill_flow_consistency(
    teacher: UNet2DConditionModel,
    states: torch.Tensor,
    latents: tuple[torch.Tensor, torch.Tensor],
    cap_idx: torch.Tensor,
    scaling_factor: float,
    budget: Budget,
    gen: torch.Generator,
) -> tuple[UNet2DConditionModel, list[float]]:
    """Consistency distillation (Song et al. 2023, arXiv 2303.01469, Alg. 2) in the guided latent form
    of LCM (Luo et al. 2023, arXiv 2310.04378, Alg. 1), with the probability-flow ODE of rectified flow
    and its Euler solver in place of DDIM (the consistency-model theory holds for any PF-ODE; the same
    swap is what consistency distillation of SD3/FLUX-type models does, e.g. Hyper-SD, arXiv 2404.13686).

    Per step: s = n / CD_GRID (n uniform in 1..CD_GRID), guidance g = 1 + w, w ~ U[w_min, w_max]; the
    student's x0 estimate at x_s is pulled to the EMA target's at the teacher's guided Euler step
    x_{s - 1/CD_GRID}. The student starts from the teacher with a zero guidance embedding (as the LCM
    does); returns a slow EMA of the student, and the per-step loss.
    """
    student = lcm_student(teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    slow = copy.deepcopy(student).requires_grad_(False)
    teacher.requires_grad_(False)
    uncond = states[0:1]
    opt = torch.optim.AdamW(student.parameters(), lr=budget.lr, weight_decay=0.0)
    bsz = budget.batch

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.randint(0, len(cap_idx), (bsz,), generator=gen)
        x0 = posterior_sample(latents, b, scaling_factor, gen)
        cond = states[cap_idx[b]]
        n = torch.randint(1, CD_GRID + 1, (bsz,), generator=gen)
        s, s_prev = n / CD_GRID, (n - 1) / CD_GRID
        w = LCD_W_MIN + (LCD_W_MAX - LCD_W_MIN) * torch.rand(bsz, generator=gen)
        w_emb = guidance_embedding(w)
        x_s = interpolate(x0, torch.randn(x0.shape, generator=gen), s)
        pred = consistency_x0(student, x_s, s, cond, w_emb)
        with torch.no_grad():
            v_c, v_u = teacher(
                torch.cat([x_s, x_s]),
                torch.cat([s, s]) * NUM_TRAIN_TIMESTEPS,
                torch.cat([cond, uncond.expand(bsz, -1, -1)]),
            ).sample.chunk(2)
            x_prev = euler_step(x_s, s, s_prev, guided(v_c, v_u, 1.0 + w))
            tgt = consistency_x0(target, x_prev, s_prev, cond, w_emb)
        loss = F.mse_loss(pred, tgt)
        return loss, loss

    def after_step(step: int) -> None:
        ema_update(target, student, LCD_TARGET_EMA)
        ema_update(slow, student, ema_decay(step, 0.995))

    losses = optimize("flow cd", budget, opt, student.parameters(), 100, loss_fn, after_step, ("loss", ".5f"))
    return slow, losses

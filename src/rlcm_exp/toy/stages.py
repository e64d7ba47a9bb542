"""The toy recipe's training stages: VAE, latent pool, teacher diffusion model, LCM distillation.

Each stage is budgeted in optimizer steps (`Schedule`), draws its data from the generators it is
given and model noise from torch's global generator, so a run is reproducible from its seed.
`rlcm_exp.toy.runner.run` calls them in order.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from rlcm_exp.toy import data
from rlcm_exp.toy.build import (
    GUIDANCE_EMBED_DIM,
    LCD_ORIGIN_STEPS,
    build_unet,
    ddim_scheduler,
    guidance_embedding,
    lcm_scheduler,
    tokenize,
)
from rlcm_exp.toy.captions import caption_attributes, noisy_caption_index

CAPTION_DROPOUT = 0.1
# LCD: the DDIM solver walks the LCM's 50-step origin grid t = 20k - 1, one grid step (20 train
# steps) per distillation step, as LCMScheduler(original_inference_steps=50) samples.
LCD_SKIP = 1000 // LCD_ORIGIN_STEPS
# Guidance w (teacher eps = cond + w (cond - uncond); the pipeline embeds w = guidance_scale - 1).
# The range holds w = 7 (guidance 8, the paper's RLCM default) and the low scales a small model
# may prefer.
LCD_W_MIN, LCD_W_MAX = 1.0, 8.0
LCD_TARGET_EMA = 0.95  # the LCM paper's EMA rate for the target network
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting: converges faster than plain epsilon MSE


@dataclass(frozen=True)
class Budget:
    """One training stage's budget: optimizer steps, batch size, peak learning rate."""

    steps: int
    batch: int
    lr: float


@dataclass(frozen=True)
class Schedule:
    """Step budget of one run. `full` makes the committed weights; `tiny` checks the plumbing."""

    vae: Budget
    n_latents: int  # training images encoded once for the diffusion stages
    teacher: Budget
    lcd: Budget
    eval_n: int  # images per split in the quick evaluation after each stage
    quality_n: int  # images per split and setting in the final quality table

    def as_record(self) -> dict:
        """Flat {vae_steps, vae_batch, vae_lr, n_latents, teacher_steps, ...}, as recipe.json records it."""
        return schedule_record(self)


def schedule_record(schedule: object) -> dict:
    """A schedule dataclass as a flat dict: each Budget field `x` as x_steps, x_batch, x_lr."""
    record: dict = {}
    for f in fields(schedule):  # type: ignore[arg-type]
        value = getattr(schedule, f.name)
        if isinstance(value, Budget):
            record.update({f"{f.name}_{b.name}": getattr(value, b.name) for b in fields(value)})
        else:
            record[f.name] = value
    return record


SCHEDULES: dict[str, Schedule] = {
    "full": Schedule(
        vae=Budget(steps=1400, batch=64, lr=1e-3),
        n_latents=32768,
        teacher=Budget(steps=3000, batch=128, lr=1e-3),
        lcd=Budget(steps=1500, batch=64, lr=2e-4),
        eval_n=64,
        quality_n=256,
    ),
    # Budget(steps, batch, lr): three steps of batch 8 per stage, every stage boundary in seconds.
    "tiny": Schedule(
        vae=Budget(3, 8, 1e-3),
        n_latents=64,
        teacher=Budget(3, 8, 1e-3),
        lcd=Budget(3, 8, 1e-4),
        eval_n=4,
        quality_n=4,
    ),
}


# ----------------------------------------------------------------------------- helpers


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_decay(step: int, peak: float) -> float:
    """Warm-up of the averaging rate so early weights do not linger (1 + n) / (10 + n)."""
    return min(peak, (1 + step) / (10 + step))


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """min(SNR, gamma) / SNR: the min-SNR weighting for epsilon prediction."""
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


def optimize(
    desc: str,
    budget: Budget,
    opt: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    warmup_cap: int,
    loss_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    after_step: Callable[[int], None] | None = None,
    postfix: tuple[str, str] = ("loss", ".4f"),
) -> list[float]:
    """The stages' common loop; returns the logged value of every step.

    Each step: learning rate (warm-up of min(warmup_cap, steps // 10 + 1) steps, then cosine),
    `loss_fn(step)` -> (loss to minimise, value to log), backward, gradient norm clipped at 1,
    optimizer step, then `after_step(step)` (EMA updates). `postfix`: the progress bar's
    (label, format) of the mean of the last 50 logged values.
    """
    params = list(params)
    label, fmt = postfix
    losses: list[float] = []
    bar = tqdm(range(budget.steps), desc=desc, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, budget.steps, budget.lr, warmup=min(warmup_cap, budget.steps // 10 + 1))
        loss, logged = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        losses.append(logged.item())
        if step % 50 == 0 or step == budget.steps - 1:
            bar.set_postfix({label: f"{np.mean(losses[-50:]):{fmt}}"})
    return losses


# ----------------------------------------------------------------------------- stages


def train_vae(vae: AutoencoderKL, s: Schedule, rng: np.random.Generator) -> list[float]:
    """Reconstruction (L1 + MSE in [-1, 1]) plus a tiny KL, on freshly drawn training images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae.lr, weight_decay=0.0)

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_pixels(data.render(s.vae.batch, rng)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample  # posterior noise from torch's global generator
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        return loss, loss

    return optimize("vae", s.vae, opt, vae.parameters(), 100, loss_fn)


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, n: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode n training images once: posterior means and stds (unscaled) plus captions."""
    images, captions = data.render(n, rng)
    means, stds = [], []
    for i in tqdm(range(0, n, 512), desc="encode", mininterval=5):
        post = vae.encode(to_pixels(images[i : i + 512])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds), captions


def posterior_sample(
    latents: tuple[torch.Tensor, torch.Tensor], b: torch.Tensor, scaling_factor: float, gen: torch.Generator
) -> torch.Tensor:
    """A fresh posterior sample of pool entries `b`, scaled to ~unit std as the pipelines expect."""
    mean, std = latents
    return (mean[b] + std[b] * torch.randn(mean[b].shape, generator=gen)) * scaling_factor


def train_teacher(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: list[str],
    scaling_factor: float,
    s: Schedule,
    gen: torch.Generator,
    caption_noise: float = 0.0,
) -> tuple[UNet2DConditionModel, CLIPTextModel, list[float]]:
    """Epsilon-prediction diffusion on scaled latents, text encoder trained jointly; returns EMA copies.

    `caption_noise` > 0 re-draws each attribute of a training caption with that probability (a fresh
    draw per step); 0 draws no extra random numbers, so the run is the same as without the option.
    """
    # The captions form a closed set: encode each distinct caption once per step, then gather.
    prompts = [""] + data.train_prompts()
    index = {p: i for i, p in enumerate(prompts)}
    ids = tokenize(tokenizer, prompts)
    cap_idx = torch.tensor([index[c] for c in captions])
    attrs = caption_attributes(captions) if caption_noise > 0 else None
    alphas_cumprod = ddim_scheduler().alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.teacher.lr, weight_decay=1e-2)
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    bsz = s.teacher.batch

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.randint(0, len(cap_idx), (bsz,), generator=gen)
        x0 = posterior_sample(latents, b, scaling_factor, gen)
        which = cap_idx[b].clone() if attrs is None else noisy_caption_index(attrs[b], caption_noise, gen)
        drop = torch.rand(bsz, generator=gen) < CAPTION_DROPOUT
        which[drop] = 0  # "" is what the pipelines feed as the negative prompt
        emb = text_encoder(ids)[0][which]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (bsz,), generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = unet(x_t, t, emb).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (snr_weights(alphas_cumprod, t) * per_sample).mean(), per_sample.mean()

    def after_step(step: int) -> None:
        decay = ema_decay(step, 0.999)
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)

    losses = optimize("teacher", s.teacher, opt, params, 200, loss_fn, after_step, ("eps_mse", ".4f"))
    return ema_unet, ema_text, losses


def consistency(
    unet: UNet2DConditionModel,
    lcm: LCMScheduler,
    x: torch.Tensor,
    t: torch.Tensor,
    emb: torch.Tensor,
    w_emb: torch.Tensor,
) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t): the boundary-conditioned LCM output."""
    eps = unet(x, t, emb, timestep_cond=w_emb).sample
    ab = lcm.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0


def lcm_student(teacher: UNet2DConditionModel) -> UNet2DConditionModel:
    """A UNet with a guidance embedding, started from the teacher.

    The guidance projection (absent in the teacher) starts at zero so the student's first output
    is the teacher's.
    """
    student = build_unet(time_cond_proj_dim=GUIDANCE_EMBED_DIM)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def distill_lcm(
    teacher: UNet2DConditionModel,
    embeddings: torch.Tensor,
    latents: tuple[torch.Tensor, torch.Tensor],
    cap_idx: torch.Tensor,
    scaling_factor: float,
    s: Schedule,
    gen: torch.Generator,
) -> tuple[UNet2DConditionModel, list[float]]:
    """Latent consistency distillation (LCM paper, Algorithm 1), with a slow EMA of the student kept for saving.

    `embeddings[0]` is the "" embedding (unconditional), `cap_idx` indexes the others.
    """
    student = lcm_student(teacher)
    target = copy.deepcopy(student).requires_grad_(False)
    slow = copy.deepcopy(student).requires_grad_(False)
    teacher.requires_grad_(False)
    lcm = lcm_scheduler()
    alphas_cumprod = lcm.alphas_cumprod
    uncond = embeddings[0:1]
    opt = torch.optim.AdamW(student.parameters(), lr=s.lcd.lr, weight_decay=0.0)
    bsz = s.lcd.batch

    def loss_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.randint(0, len(cap_idx), (bsz,), generator=gen)
        x0 = posterior_sample(latents, b, scaling_factor, gen)
        emb = embeddings[cap_idx[b]]
        # 1. a point t_{n+k} on the origin grid and its predecessor t_n one solver step earlier.
        k = torch.randint(1, LCD_ORIGIN_STEPS + 1, (bsz,), generator=gen)
        t = k * LCD_SKIP - 1
        t_prev = (t - LCD_SKIP).clamp(min=0)
        # 2. guidance w ~ U[w_min, w_max] and its embedding.
        w = LCD_W_MIN + (LCD_W_MAX - LCD_W_MIN) * torch.rand(bsz, generator=gen)
        w_emb = guidance_embedding(w)
        # 3. forward diffusion x_{t_{n+k}} = sqrt(abar) x0 + sqrt(1 - abar) eps.
        ab_t = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * torch.randn(x0.shape, generator=gen)
        # 4. student prediction f_theta(x_{t_{n+k}}, w, c, t_{n+k}).
        pred = consistency(student, lcm, x_t, t, emb, w_emb)
        with torch.no_grad():
            # 5. teacher DDIM step with CFG: eps_w = eps_c + w (eps_c - eps_u); x0 likewise.
            eps_both = teacher(
                torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([emb, uncond.expand(bsz, -1, -1)])
            ).sample
            eps_c, eps_u = eps_both.chunk(2)
            eps = eps_c + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x0_hat = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
            ab_prev = alphas_cumprod[t_prev].view(-1, 1, 1, 1)
            x_prev = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps
            # 6. target f_theta-(x_{t_n}, w, c, t_n) from the EMA network.
            tgt = consistency(target, lcm, x_prev, t_prev, emb, w_emb)
        loss = F.mse_loss(pred, tgt)
        return loss, loss

    def after_step(step: int) -> None:
        ema_update(target, student, LCD_TARGET_EMA)
        ema_update(slow, student, ema_decay(step, 0.995))

    losses = optimize("lcd", s.lcd, opt, student.parameters(), 100, loss_fn, after_step, ("loss", ".5f"))
    return slow, losses

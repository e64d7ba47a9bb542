"""Train the toy model family on a CPU: VAE -> text encoder + teacher UNet -> LCM distillation.

    python -m rlcm_exp.toy.recipe --out src/rlcm_exp/toy/weights --seed 0 --schedule full

The recipe mirrors how the real models were made, in miniature:
1. a tiny `AutoencoderKL` (32x32 RGB -> 4x8x8 latents) trained on reconstruction with a tiny KL term;
2. a tiny CLIP text encoder trained jointly with a tiny `UNet2DConditionModel` as an
   epsilon-prediction diffusion model on the scaled latents (Stable Diffusion's noise schedule),
   with 10% caption dropout to "" for classifier-free guidance: the DDIM member (DDPO's base);
   with caption noise (`--caption-noise q`, default 0.2: each attribute word of a training caption
   re-drawn at random with probability q, as web captions are often wrong), which makes the model
   need guidance to follow its caption, as the real models do;
3. latent consistency distillation (LCM paper, Alg. 1) into a UNet with a guidance embedding
   (`time_cond_proj_dim`): DDIM teacher solver over the 50-step grid with skip 20, guidance
   w ~ U[w_min, w_max], EMA target network: the LCM member (RLCM's base);
4. both saved as diffusers pipeline folders (fp16 safetensors) and measured by `quality`.

Everything is budgeted in optimizer steps, so a run is reproducible from its seed regardless of
how busy the machine is; wall-clock per stage is recorded in recipe.json.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlcm_exp.tokenizer import write_clip_tokenizer
from rlcm_exp.toy import data
from rlcm_exp.toy.detector import detector_score
from rlcm_exp.toy.quality import cycle, sample

RECIPE_VERSION = "toy-recipe-2"  # 2: caption noise 0.2 by default (1: none)
MAX_TOKENS = 16
TEXT_DIM = 64
GUIDANCE_EMBED_DIM = 64  # time_cond_proj_dim of the LCM UNet
CAPTION_DROPOUT = 0.1
# Probability of re-drawing each attribute word of a teacher training caption. With clean captions
# (recipe 1) a 1M-parameter teacher follows its caption at guidance 2 and DDIM-4 is as good as the
# LCM-4; with noisy ones it needs guidance, which few-step DDIM handles badly (README, toy world).
CAPTION_NOISE = 0.2
# LCD: the DDIM solver walks the LCM's 50-step origin grid t = 20k - 1, one grid step (20 train
# steps) per distillation step, as LCMScheduler(original_inference_steps=50) samples.
LCD_ORIGIN_STEPS = 50
LCD_SKIP = 1000 // LCD_ORIGIN_STEPS
# Guidance w (teacher eps = cond + w (cond - uncond); the pipeline embeds w = guidance_scale - 1).
# The range holds w = 7 (guidance 8, the paper's RLCM default) and the low scales a small model
# may prefer.
LCD_W_MIN, LCD_W_MAX = 1.0, 8.0
LCD_TARGET_EMA = 0.95  # the LCM paper's EMA rate for the target network
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting: converges faster than plain epsilon MSE


@dataclass(frozen=True)
class Schedule:
    """Step budget of one run. `full` makes the committed weights; `tiny` checks the plumbing."""

    vae_steps: int
    vae_batch: int
    vae_lr: float
    n_latents: int  # training images encoded once for the diffusion stages
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    lcd_steps: int
    lcd_batch: int
    lcd_lr: float
    eval_n: int  # images per split in the quick evaluation after each stage
    quality_n: int  # images per split and setting in the final quality table


SCHEDULES: dict[str, Schedule] = {
    "full": Schedule(
        vae_steps=1400,
        vae_batch=64,
        vae_lr=1e-3,
        n_latents=32768,
        teacher_steps=3000,
        teacher_batch=128,
        teacher_lr=1e-3,
        lcd_steps=1500,
        lcd_batch=64,
        lcd_lr=2e-4,
        eval_n=64,
        quality_n=256,
    ),
    "tiny": Schedule(
        vae_steps=3,
        vae_batch=8,
        vae_lr=1e-3,
        n_latents=64,
        teacher_steps=3,
        teacher_batch=8,
        teacher_lr=1e-3,
        lcd_steps=3,
        lcd_batch=8,
        lcd_lr=1e-4,
        eval_n=4,
        quality_n=4,
    ),
}


# ----------------------------------------------------------------------------- model builders


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write the closed-vocabulary CLIP tokenizer (every caption word is one token) and load it."""
    write_clip_tokenizer(folder, data.vocabulary(), model_max_length=MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(str(folder))


def build_vae() -> AutoencoderKL:
    """32x32 -> 4x8x8 (factor 4). No mid-block attention: at 8x8 it buys nothing for flat shapes."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=data.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer over the toy vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(time_cond_proj_dim: int | None = None) -> UNet2DConditionModel:
    """Two resolutions (8x8, 4x4), cross-attention at both so the caption reaches every pixel."""
    return UNet2DConditionModel(
        sample_size=data.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),  # diffusers' legacy name: these are head counts (head dim 16)
        norm_num_groups=16,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def ddim_scheduler() -> DDIMScheduler:
    """Stable Diffusion's schedule, as DDPO samples it."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def lcm_scheduler() -> LCMScheduler:
    """The same noise schedule with LCM's 50-step origin grid and boundary-condition scaling."""
    return LCMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        original_inference_steps=LCD_ORIGIN_STEPS,
        timestep_scaling=10.0,
    )


def diffusion_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:  # noqa: ANN001
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_pipeline(vae, text_encoder, tokenizer, unet) -> LatentConsistencyModelPipeline:  # noqa: ANN001
    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=lcm_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guidance_embedding(w: torch.Tensor) -> torch.Tensor:
    """The guidance embedding exactly as LatentConsistencyModelPipeline computes it (w = g - 1)."""
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, w, embedding_dim=GUIDANCE_EMBED_DIM
    )  # type: ignore[arg-type]


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
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach(), 1.0 - decay)


def ema_decay(step: int, peak: float) -> float:
    """Warm-up of the averaging rate so early weights do not linger (1 + n) / (10 + n)."""
    return min(peak, (1 + step) / (10 + step))


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as the pipelines build them (pad to model_max_length)."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def vae_reconstruction_score(vae: AutoencoderKL, prompts: list[str], n: int, seed: int) -> float:
    """Detector score of VAE reconstructions (posterior mode) of fresh images of `prompts`."""
    rng = np.random.default_rng(seed)
    images, captions = data.render([prompts[i % len(prompts)] for i in range(n)], rng)
    scores = []
    for i in range(0, n, 256):
        x = to_pixels(images[i : i + 256])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(detector_score(rec.add(1).div(2).clamp(0, 1), captions[i : i + 256]))
    return float(np.concatenate(scores).mean())


def sample_score(pipe, prompts: list[str], seed: int, **kwargs) -> float:  # noqa: ANN001
    """Detector score of pipeline samples for `prompts` (sampling as `quality` does it)."""
    return float(detector_score(sample(pipe, prompts, seed, **kwargs), prompts).mean())


# ----------------------------------------------------------------------------- stages


def train_vae(vae: AutoencoderKL, s: Schedule, rng: np.random.Generator) -> list[float]:
    """Reconstruction (L1 + MSE in [-1, 1]) plus a tiny KL, on freshly drawn training images."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(s.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.vae_steps, s.vae_lr, warmup=min(100, s.vae_steps // 10 + 1))
        x = to_pixels(data.render(s.vae_batch, rng)[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == s.vae_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


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


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """min(SNR, gamma) / SNR: the min-SNR weighting for epsilon prediction."""
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


def caption_attributes(captions: list[str]) -> torch.Tensor:
    """(N, 3) indices of (shape colour, shape, background) of toy captions."""
    parsed = [data.parse_caption(c) for c in captions]
    triples = [p for p in parsed if p is not None]
    if len(triples) != len(captions):
        raise ValueError(
            "not toy captions: " + ", ".join(c for c, p in zip(captions, parsed, strict=True) if p is None)
        )
    return torch.tensor(
        [[data.COLOURS.index(c), data.SHAPES.index(s), data.COLOURS.index(b)] for c, s, b in triples]
    )


@functools.cache
def _training_caption_table() -> torch.Tensor:
    """(colour, shape, background) -> index into [""] + train_prompts(); -1 where not a training caption."""
    table = torch.full((len(data.COLOURS), len(data.SHAPES), len(data.COLOURS)), -1, dtype=torch.long)
    for i, (c, s, b) in enumerate(caption_attributes(data.train_prompts()).tolist()):
        table[c, s, b] = i + 1
    return table


def check_caption_noise(q: float) -> None:
    if not 0.0 <= q < 1.0:
        raise ValueError(f"caption_noise={q}: a probability in [0, 1) (0: clean captions)")


def noisy_caption_index(attrs: torch.Tensor, q: float, gen: torch.Generator) -> torch.Tensor:
    """Index into [""] + train_prompts() of each caption, each attribute re-drawn uniformly with prob q.

    A re-drawn caption that is not a training composition (held out, or shape colour = background)
    falls back to the true one, so no held-out caption is ever trained on.
    """
    table = _training_caption_table()
    noisy = attrs.clone()
    for k, n in enumerate((len(data.COLOURS), len(data.SHAPES), len(data.COLOURS))):
        redraw = torch.rand(len(attrs), generator=gen) < q
        noisy[redraw, k] = torch.randint(0, n, (int(redraw.sum()),), generator=gen)
    true = table[attrs[:, 0], attrs[:, 1], attrs[:, 2]]
    drawn = table[noisy[:, 0], noisy[:, 1], noisy[:, 2]]
    return torch.where(drawn >= 0, drawn, true)


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
    mean, std = latents
    # The captions form a closed set: encode each distinct caption once per step, then gather.
    prompts = [""] + data.train_prompts()
    index = {p: i for i, p in enumerate(prompts)}
    ids = tokenize(tokenizer, prompts)
    cap_idx = torch.tensor([index[c] for c in captions])
    attrs = caption_attributes(captions) if caption_noise > 0 else None
    alphas_cumprod = ddim_scheduler().alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.teacher_lr, weight_decay=1e-2)
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    losses = []
    bar = tqdm(range(s.teacher_steps), desc="teacher", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.teacher_steps, s.teacher_lr, warmup=min(200, s.teacher_steps // 10 + 1))
        b = torch.randint(0, len(cap_idx), (s.teacher_batch,), generator=gen)
        # A fresh posterior sample each time, scaled to ~unit std as the pipelines expect.
        x0 = (mean[b] + std[b] * torch.randn(mean[b].shape, generator=gen)) * scaling_factor
        which = cap_idx[b].clone() if attrs is None else noisy_caption_index(attrs[b], caption_noise, gen)
        drop = torch.rand(s.teacher_batch, generator=gen) < CAPTION_DROPOUT
        which[drop] = 0  # "" is what the pipelines feed as the negative prompt
        emb = text_encoder(ids)[0][which]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (s.teacher_batch,), generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = unet(x_t, t, emb).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (snr_weights(alphas_cumprod, t) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = ema_decay(step, 0.999)
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        losses.append(per_sample.mean().item())
        if step % 50 == 0 or step == s.teacher_steps - 1:
            bar.set_postfix(eps_mse=f"{np.mean(losses[-50:]):.4f}")
    return ema_unet, ema_text, losses


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
    mean, std = latents
    student = build_unet(time_cond_proj_dim=GUIDANCE_EMBED_DIM)
    # Start from the teacher; the guidance projection (absent in the teacher) starts at zero so
    # the student's first output is the teacher's.
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    target = copy.deepcopy(student).requires_grad_(False)
    slow = copy.deepcopy(student).requires_grad_(False)
    teacher.requires_grad_(False)
    lcm = lcm_scheduler()
    alphas_cumprod = lcm.alphas_cumprod
    uncond = embeddings[0:1]
    opt = torch.optim.AdamW(student.parameters(), lr=s.lcd_lr, weight_decay=0.0)

    def consistency(unet: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, emb, w_emb) -> torch.Tensor:  # noqa: ANN001
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t): the boundary-conditioned LCM output."""
        eps = unet(x, t, emb, timestep_cond=w_emb).sample
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0

    losses = []
    bar = tqdm(range(s.lcd_steps), desc="lcd", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s.lcd_steps, s.lcd_lr, warmup=min(100, s.lcd_steps // 10 + 1))
        bsz = s.lcd_batch
        b = torch.randint(0, len(cap_idx), (bsz,), generator=gen)
        x0 = (mean[b] + std[b] * torch.randn(mean[b].shape, generator=gen)) * scaling_factor
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
        pred = consistency(student, x_t, t, emb, w_emb)
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
            tgt = consistency(target, x_prev, t_prev, emb, w_emb)
        loss = F.mse_loss(pred, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, LCD_TARGET_EMA)
        ema_update(slow, student, ema_decay(step, 0.995))
        losses.append(loss.item())
        if step % 50 == 0 or step == s.lcd_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
    return slow, losses


# ----------------------------------------------------------------------------- saving


def save_pipeline(pipe, folder: Path) -> None:  # noqa: ANN001
    """Safetensors; VAE and UNet in fp16 to keep the committed weights under 10 MB.

    The text encoder stays fp32 (0.4 MB): transformers 5 loads weights in their stored dtype
    while diffusers upcasts to fp32, so an fp16 text encoder would give a mixed-dtype pipeline
    unless every caller passed `dtype=torch.float32`. transformers 5 may also save a tokenizer
    as tokenizer.json only; the slow-format files keep `CLIPTokenizer.from_pretrained` working.
    """
    if folder.exists():
        shutil.rmtree(folder)
    half = copy.deepcopy(pipe)
    half.vae.to(torch.float16)
    half.unet.to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")
    write_clip_tokenizer(folder / "tokenizer", data.vocabulary(), model_max_length=MAX_TOKENS)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- main


def run(
    out: str | Path,
    seed: int = 0,
    schedule: str = "full",
    threads: int = 2,
    caption_noise: float = CAPTION_NOISE,
) -> dict:
    """Run every stage, save both pipelines under `out`, evaluate; returns the recipe record.

    `caption_noise`: probability of re-drawing each attribute word of a teacher training caption
    (0: clean captions). Distillation always sees the true captions.

    `threads`: torch intra-op threads. On a machine whose cores are shared with other jobs, use
    1 (and pin it with taskset): OpenMP threads that wait on a busy core ran ~10x slower here.
    """
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    # Denormal floats (tiny activations of barely trained nets) are very slow on CPUs.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    s = SCHEDULES[schedule]
    check_caption_noise(caption_noise)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    train, held = data.train_prompts(), data.heldout_prompts()
    record: dict = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "schedule": schedule,
        "threads": threads,
        "schedule_steps": asdict(s),
        "image_size": data.IMAGE_SIZE,
        "lcd": {
            "origin_steps": LCD_ORIGIN_STEPS,
            "skip": LCD_SKIP,
            "w_range": [LCD_W_MIN, LCD_W_MAX],
            "target_ema": LCD_TARGET_EMA,
        },
        "caption_dropout": CAPTION_DROPOUT,
        "caption_noise": caption_noise,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "wall_clock_s": {},
        "stage_eval": {},
    }
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        record["wall_clock_s"][stage] = round(now - clock, 1)
        clock = now

    def report(stage: str, values: dict) -> None:
        record["stage_eval"][stage] = values
        print(
            f"[{stage}] "
            + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
            flush=True,
        )

    # 1. VAE -----------------------------------------------------------------------------
    vae = build_vae()
    vae_losses = train_vae(vae, s, rng)
    vae.eval().requires_grad_(False)
    report(
        "vae",
        {
            "loss_last50": float(np.mean(vae_losses[-50:])),
            "recon_train": vae_reconstruction_score(vae, train, 4 * s.eval_n, seed + 1),
            "recon_heldout": vae_reconstruction_score(vae, held, 4 * s.eval_n, seed + 2),
        },
    )
    lap("vae")

    # 2. latents, scaling factor, text encoder + teacher UNet -------------------------------
    mean, std, captions = encode_pool(vae, s.n_latents, rng)
    scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    report(
        "latents",
        {"scaling_factor": scaling_factor, "mean": float(mean.mean()), "posterior_std": float(std.mean())},
    )
    tok_dir = out / "_tokenizer"
    tokenizer = build_tokenizer(tok_dir)
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    lap("encode")
    unet, text_encoder, teacher_losses = train_teacher(
        unet, text_encoder, tokenizer, (mean, std), captions, scaling_factor, s, gen, caption_noise
    )
    unet.eval()
    text_encoder.eval()
    ddim = diffusion_pipeline(vae, text_encoder, tokenizer, unet)
    teacher_eval: dict = {"eps_mse_last50": float(np.mean(teacher_losses[-50:]))}
    for g in (3.0, 5.0, 8.0):
        teacher_eval[f"ddim20_g{g:g}_train"] = sample_score(
            ddim, cycle(train, s.eval_n), seed + 3, num_inference_steps=20, guidance_scale=g
        )
        teacher_eval[f"ddim20_g{g:g}_heldout"] = sample_score(
            ddim, cycle(held, s.eval_n), seed + 4, num_inference_steps=20, guidance_scale=g
        )
    report("teacher", teacher_eval)
    # The diffusion member is final now: save it before distilling, so it survives a later failure.
    save_pipeline(ddim, out / "diffusion")
    lap("teacher")

    # 3. latent consistency distillation --------------------------------------------------
    with torch.no_grad():
        prompts = [""] + train
        embeddings = text_encoder(tokenize(tokenizer, prompts))[0]
    index = {p: i for i, p in enumerate(prompts)}
    cap_idx = torch.tensor([index[c] for c in captions])
    lcm_unet, lcd_losses = distill_lcm(unet, embeddings, (mean, std), cap_idx, scaling_factor, s, gen)
    lcm_unet.eval()
    lcm = lcm_pipeline(vae, text_encoder, tokenizer, lcm_unet)
    lcd_eval: dict = {"loss_last50": float(np.mean(lcd_losses[-50:]))}
    for steps in (2, 4):
        for g in (4.0, 8.0):
            lcd_eval[f"lcm{steps}_g{g:g}_train"] = sample_score(
                lcm, cycle(train, s.eval_n), seed + 5, num_inference_steps=steps, guidance_scale=g
            )
            lcd_eval[f"lcm{steps}_g{g:g}_heldout"] = sample_score(
                lcm, cycle(held, s.eval_n), seed + 6, num_inference_steps=steps, guidance_scale=g
            )
    report("lcd", lcd_eval)
    lap("lcd")

    # 4. save ------------------------------------------------------------------------------
    save_pipeline(lcm, out / "lcm")
    shutil.rmtree(tok_dir)
    record["params"] = {
        "vae": n_params(vae),
        "text_encoder": n_params(text_encoder),
        "unet": n_params(unet),
        "lcm_unet": n_params(lcm_unet),
    }
    record["bytes_on_disk"] = {"diffusion": folder_bytes(out / "diffusion"), "lcm": folder_bytes(out / "lcm")}
    lap("save")
    (out / "recipe.json").write_text(json.dumps(record, indent=1))

    # 5. quality, with the pipelines loaded back from disk ----------------------------------
    from rlcm_exp.toy.quality import measure

    measure(out, n=s.quality_n, seed=seed, sweep_n=max(4, s.quality_n // 4), threads=threads)
    lap("quality")
    record["wall_clock_s"]["total"] = round(sum(record["wall_clock_s"].values()), 1)
    (out / "recipe.json").write_text(json.dumps(record, indent=1))
    print(f"wall clock per stage (s): {record['wall_clock_s']}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument("--threads", type=int, default=2, help="1 on a machine shared with other jobs")
    parser.add_argument(
        "--caption-noise",
        type=float,
        default=CAPTION_NOISE,
        help="probability of re-drawing each attribute word of a teacher training caption "
        f"(default {CAPTION_NOISE}; 0: clean captions)",
    )
    args = parser.parse_args()
    try:
        check_caption_noise(args.caption_noise)
    except ValueError as err:
        parser.error(f"--caption-noise: {err}")
    run(**vars(args))  # every flag is one of run()'s arguments, by name


if __name__ == "__main__":
    main()

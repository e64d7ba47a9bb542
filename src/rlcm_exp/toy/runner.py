"""Train the toy model family on a CPU: VAE -> text encoder + teacher UNet -> LCM distillation.

The recipe mirrors how the real models were made, in miniature:
1. a tiny `AutoencoderKL` (32x32 RGB -> 4x8x8 latents) trained on reconstruction with a tiny KL term;
2. a tiny CLIP text encoder trained jointly with a tiny `UNet2DConditionModel` as an
   epsilon-prediction diffusion model on the scaled latents (Stable Diffusion's noise schedule),
   with 10% caption dropout to "" for classifier-free guidance: the DDIM member (DDPO's base);
   with caption noise (`caption_noise=q`, default 0.2: each attribute word of a training caption
   re-drawn at random with probability q, as web captions are often wrong), which makes the model
   need guidance to follow its caption, as the real models do;
3. latent consistency distillation (LCM paper, Alg. 1) into a UNet with a guidance embedding
   (`time_cond_proj_dim`): DDIM teacher solver over the 50-step grid with skip 20, guidance
   w ~ U[w_min, w_max], EMA target network: the LCM member (RLCM's base);
4. both saved as diffusers pipeline folders (fp16 safetensors) and measured by `scoring.measure`.

Everything is budgeted in optimizer steps, so a run is reproducible from its seed regardless of
how busy the machine is; wall-clock per stage is recorded in recipe.json. Models are built and
trained in a fixed order: their initial weights and the VAE's posterior noise come from torch's
global generator.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rlcm_exp.toy import data
from rlcm_exp.toy.build import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    diffusion_pipeline,
    lcm_pipeline,
    save_pipeline,
    tokenize,
)
from rlcm_exp.toy.captions import CAPTION_NOISE, check_caption_noise
from rlcm_exp.toy.detector import detector_score
from rlcm_exp.toy.scoring import cycle, measure, sample_score
from rlcm_exp.toy.stages import (
    CAPTION_DROPOUT,
    LCD_ORIGIN_STEPS,
    LCD_SKIP,
    LCD_TARGET_EMA,
    LCD_W_MAX,
    LCD_W_MIN,
    SCHEDULES,
    Schedule,
    distill_lcm,
    encode_pool,
    to_pixels,
    train_teacher,
    train_vae,
)

RECIPE_VERSION = "toy-recipe-2"  # 2: caption noise 0.2 by default (1: none)


@dataclass(frozen=True)
class RecipeOptions:
    """The options of a toy recipe run, the same for both recipes (`run`, `flow_runner.run_flow`);
    `python -m rlcm_exp.toy.recipe` fills them from its flags and recipe.json records them."""

    seed: int = 0  # seeds the data (numpy) and noise (torch) generators and torch's global one
    # a key of the recipe's schedules: full (makes the committed weights) | tiny (checks the plumbing)
    schedule: str = "full"
    # torch intra-op threads. On a machine whose cores are shared with other jobs, use 1 (and pin it
    # with taskset): OpenMP threads that wait on a busy core ran ~10x slower here.
    threads: int = 2
    # probability of re-drawing each attribute word of a teacher training caption (0: clean
    # captions); distillation always sees the true captions
    caption_noise: float = CAPTION_NOISE


class _Record:
    """recipe.json as it grows: the settings, then each stage's evaluation and wall-clock seconds."""

    def __init__(self, settings: dict) -> None:
        self.data: dict = {**settings, "wall_clock_s": {}, "stage_eval": {}}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        """Seconds since the last lap, under `stage`."""
        now = time.perf_counter()
        self.data["wall_clock_s"][stage] = round(now - self._clock, 1)
        self._clock = now

    def report(self, stage: str, values: dict) -> None:
        """Record a stage's evaluation and print it on one line."""
        self.data["stage_eval"][stage] = values
        shown = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{stage}] " + ", ".join(shown), flush=True)

    def write(self, out: Path) -> None:
        (out / "recipe.json").write_text(json.dumps(self.data, indent=1))


def _settings(options: RecipeOptions) -> dict:
    """The run's settings and software versions, the head of recipe.json."""
    return {
        "recipe_version": RECIPE_VERSION,
        "seed": options.seed,
        "schedule": options.schedule,
        "threads": options.threads,
        "schedule_steps": SCHEDULES[options.schedule].as_record(),
        "image_size": data.IMAGE_SIZE,
        "lcd": {
            "origin_steps": LCD_ORIGIN_STEPS,
            "skip": LCD_SKIP,
            "w_range": [LCD_W_MIN, LCD_W_MAX],
            "target_ema": LCD_TARGET_EMA,
        },
        "caption_dropout": CAPTION_DROPOUT,
        "caption_noise": options.caption_noise,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }


@torch.no_grad()
def vae_reconstruction_score(vae, prompts: list[str], n: int, seed: int) -> float:  # noqa: ANN001
    """Detector score of VAE reconstructions (posterior mode) of fresh images of `prompts`."""
    rng = np.random.default_rng(seed)
    images, captions = data.render(cycle(prompts, n), rng)
    scores = []
    for i in range(0, n, 256):
        x = to_pixels(images[i : i + 256])
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(detector_score(rec.add(1).div(2).clamp(0, 1), captions[i : i + 256]))
    return float(np.concatenate(scores).mean())


def _score_both_splits(values: dict, name: str, pipe, n: int, seeds: tuple[int, int], **kwargs) -> None:  # noqa: ANN001
    """values[f"{name}_train"], values[f"{name}_heldout"]: sample scores on `n` prompts of each split."""
    splits = (("train", data.train_prompts()), ("heldout", data.heldout_prompts()))
    for (split, prompts), seed in zip(splits, seeds, strict=True):
        values[f"{name}_{split}"] = sample_score(pipe, cycle(prompts, n), seed, **kwargs)


def n_params(m: torch.nn.Module) -> int:
    """Number of parameters of `m`."""
    return sum(p.numel() for p in m.parameters())


def folder_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _vae_stage(s: Schedule, seed: int, rng: np.random.Generator, record: _Record) -> AutoencoderKL:
    """1. The VAE, trained, frozen and evaluated on reconstructions."""
    vae = build_vae()
    vae_losses = train_vae(vae, s, rng)
    vae.eval().requires_grad_(False)
    train, held = data.train_prompts(), data.heldout_prompts()
    record.report(
        "vae",
        {
            "loss_last50": float(np.mean(vae_losses[-50:])),
            "recon_train": vae_reconstruction_score(vae, train, 4 * s.eval_n, seed + 1),
            "recon_heldout": vae_reconstruction_score(vae, held, 4 * s.eval_n, seed + 2),
        },
    )
    record.lap("vae")
    return vae


@dataclass
class _Teacher:
    """What the teacher stage hands to distillation."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    latents: tuple[torch.Tensor, torch.Tensor]  # the pool's posterior means and stds (unscaled)
    captions: list[str]  # the pool's true captions
    scaling_factor: float


def _teacher_stage(
    vae, s: Schedule, seed: int, rng, gen, caption_noise: float, out: Path, record: _Record
) -> _Teacher:  # noqa: ANN001
    """2. Latent pool and scaling factor, then text encoder + teacher UNet; saves the diffusion member."""
    mean, std, captions = encode_pool(vae, s.n_latents, rng)
    scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    record.report(
        "latents",
        {"scaling_factor": scaling_factor, "mean": float(mean.mean()), "posterior_std": float(std.mean())},
    )
    tokenizer = build_tokenizer(out / "_tokenizer")
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet()
    record.lap("encode")
    unet, text_encoder, teacher_losses = train_teacher(
        unet, text_encoder, tokenizer, (mean, std), captions, scaling_factor, s, gen, caption_noise
    )
    unet.eval()
    text_encoder.eval()
    ddim = diffusion_pipeline(vae, text_encoder, tokenizer, unet)
    teacher_eval: dict = {"eps_mse_last50": float(np.mean(teacher_losses[-50:]))}
    for g in (3.0, 5.0, 8.0):
        _score_both_splits(
            teacher_eval,
            f"ddim20_g{g:g}",
            ddim,
            s.eval_n,
            (seed + 3, seed + 4),
            num_inference_steps=20,
            guidance_scale=g,
        )
    record.report("teacher", teacher_eval)
    # The diffusion member is final now: save it before distilling, so it survives a later failure.
    save_pipeline(ddim, out / "diffusion")
    record.lap("teacher")
    return _Teacher(tokenizer, text_encoder, unet, (mean, std), captions, scaling_factor)


def _lcd_stage(vae, teacher: _Teacher, s: Schedule, seed: int, gen: torch.Generator, record: _Record):  # noqa: ANN001, ANN202
    """3. Latent consistency distillation from the teacher, evaluated; returns (lcm pipeline, lcm unet)."""
    with torch.no_grad():
        prompts = [""] + data.train_prompts()
        embeddings = teacher.text_encoder(tokenize(teacher.tokenizer, prompts))[0]
    index = {p: i for i, p in enumerate(prompts)}
    cap_idx = torch.tensor([index[c] for c in teacher.captions])
    lcm_unet, lcd_losses = distill_lcm(
        teacher.unet, embeddings, teacher.latents, cap_idx, teacher.scaling_factor, s, gen
    )
    lcm_unet.eval()
    lcm = lcm_pipeline(vae, teacher.text_encoder, teacher.tokenizer, lcm_unet)
    lcd_eval: dict = {"loss_last50": float(np.mean(lcd_losses[-50:]))}
    for steps in (2, 4):
        for g in (4.0, 8.0):
            _score_both_splits(
                lcd_eval,
                f"lcm{steps}_g{g:g}",
                lcm,
                s.eval_n,
                (seed + 5, seed + 6),
                num_inference_steps=steps,
                guidance_scale=g,
            )
    record.report("lcd", lcd_eval)
    record.lap("lcd")
    return lcm, lcm_unet


def _setup_torch(seed: int, threads: int) -> None:
    """Progress bars of the libraries off, `threads` intra-op threads, no denormals, global seed."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    # Denormal floats (tiny activations of barely trained nets) are very slow on CPUs.
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)


def start_run(out: str | Path, options: RecipeOptions) -> tuple[Path, np.random.Generator, torch.Generator]:
    """A recipe's start: torch set up (`_setup_torch`), the caption noise checked, `out` made; returns it
    with the run's data generator (numpy) and noise generator (torch), both seeded with the seed."""
    _setup_torch(options.seed, options.threads)
    check_caption_noise(options.caption_noise)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out, np.random.default_rng(options.seed), torch.Generator().manual_seed(options.seed)


def run(out: str | Path, options: RecipeOptions = RecipeOptions()) -> dict:
    """Run every stage, save both pipelines under `out`, evaluate; returns the recipe record."""
    s, seed = SCHEDULES[options.schedule], options.seed
    out, rng, gen = start_run(out, options)
    record = _Record(_settings(options))

    vae = _vae_stage(s, seed, rng, record)
    teacher = _teacher_stage(vae, s, seed, rng, gen, options.caption_noise, out, record)
    lcm, lcm_unet = _lcd_stage(vae, teacher, s, seed, gen, record)

    # 4. save ------------------------------------------------------------------------------
    save_pipeline(lcm, out / "lcm")
    shutil.rmtree(out / "_tokenizer")
    record.data["params"] = {
        "vae": n_params(vae),
        "text_encoder": n_params(teacher.text_encoder),
        "unet": n_params(teacher.unet),
        "lcm_unet": n_params(lcm_unet),
    }
    record.data["bytes_on_disk"] = {
        "diffusion": folder_bytes(out / "diffusion"),
        "lcm": folder_bytes(out / "lcm"),
    }
    record.lap("save")
    record.write(out)

    # 5. quality, with the pipelines loaded back from disk ----------------------------------
    measure(out, n=s.quality_n, seed=seed, sweep_n=max(4, s.quality_n // 4), threads=options.threads)
    record.lap("quality")
    record.data["wall_clock_s"]["total"] = round(sum(record.data["wall_clock_s"].values()), 1)
    record.write(out)
    print(f"wall clock per stage (s): {record.data['wall_clock_s']}", flush=True)
    return record.data

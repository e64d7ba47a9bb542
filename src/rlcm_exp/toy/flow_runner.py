"""Train the toy flow pair on a CPU: a rectified-flow teacher UNet and its consistency-distilled student.

The recipe (`python -m rlcm_exp.toy.recipe --family flow`, `make toy-flow-model`):
1. the toy world's VAE and text encoder, frozen, loaded from the committed diffusion member (the flow
   pair shares them, as SD3-Large and SD3-Large-Turbo share theirs); a pool of training images
   encoded once (posterior means and stds), scaled by the VAE's scaling factor;
2. the diffusion member's UNet (epsilon prediction, VP schedule) fine-tuned by rectified flow to predict
   the velocity eps - x0 at t = 1000 s (caption noise and 10% caption dropout for classifier-free
   guidance, as the diffusion teacher): the many-step member, sampled by FlowMatchEulerDiscreteScheduler's
   Euler steps. Starting from the diffusion UNet rather than from scratch cuts the teacher's budget
   several-fold (it already maps captions to shapes); converting a diffusion model into a flow model by
   fine-tuning is how e.g. InstaFlow (arXiv 2309.06380) started from SD 1.5;
3. consistency distillation along the teacher's guided flow ODE into the same UNet with a guidance
   embedding: the few-step member, sampled by the multistep consistency sampler (x0 estimate
   re-noised to the next s, last step deterministic);
4. both saved as pipeline folders (fp16 safetensors, FlowMatchEulerDiscreteScheduler config beside the
   UNet) under DIR/teacher and DIR/student, recipe.json, then `flow_scoring.measure_flow` (quality.json).

A UNet, not an SD3 transformer: the toy stays on one CPU core, and the policies see the same
interface (a velocity from (x_s, t = 1000 s, text states)). Budgeted in optimizer steps, so a run is
reproducible from its seed; wall-clock per stage goes to recipe.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from rlcm_exp.toy import DIFFUSION_DIR, data
from rlcm_exp.toy.build import NO_SAFETY_CHECKER, flow_pipeline, save_pipeline, tokenize
from rlcm_exp.toy.captions import caption_attributes
from rlcm_exp.toy.flow import SCHEDULER_CONFIG
from rlcm_exp.toy.flow_scoring import FlowMember, measure_flow
from rlcm_exp.toy.flow_stages import CD_GRID, FLOW_SCHEDULES, distill_flow_consistency, train_flow_teacher
from rlcm_exp.toy.runner import RecipeOptions, _Record, folder_bytes, n_params, start_run
from rlcm_exp.toy.scoring import cycle
from rlcm_exp.toy.stages import CAPTION_DROPOUT, LCD_TARGET_EMA, LCD_W_MAX, LCD_W_MIN, encode_pool

FLOW_RECIPE_VERSION = "toy-flow-recipe-1"


def _settings(options: RecipeOptions, base: Path) -> dict:
    """The run's settings, the head of recipe.json."""
    return {
        "recipe_version": FLOW_RECIPE_VERSION,
        "family": "flow",
        "seed": options.seed,
        "schedule": options.schedule,
        "threads": options.threads,
        "schedule_steps": FLOW_SCHEDULES[options.schedule].as_record(),
        "base_components": str(base.name),  # the frozen VAE, text encoder and tokenizer came from here
        "scheduler": SCHEDULER_CONFIG,
        "teacher_objective": "rectified flow, v = eps - x0, s ~ U(0, 1)",
        "cd": {"grid": CD_GRID, "w_range": [LCD_W_MIN, LCD_W_MAX], "target_ema": LCD_TARGET_EMA},
        "caption_dropout": CAPTION_DROPOUT,
        "caption_noise": options.caption_noise,
    }


def _eval(
    record: _Record,
    stage: str,
    member: FlowMember,
    settings: list[tuple[int, float]],
    n: int,
    seed: int,
    extra: dict,
) -> None:
    """Quick scores of `member` at each (steps, guidance) on `n` prompts of each split."""
    values = dict(extra)
    for steps, g in settings:
        for split, prompts in (("train", data.train_prompts()), ("heldout", data.heldout_prompts())):
            values[f"{steps}steps_g{g:g}_{split}"] = member.score(cycle(prompts, n), seed, steps, g)[0]
    record.report(stage, values)


@dataclass
class _Pool:
    """The frozen components and the encoded training pool both stages train on."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    states: torch.Tensor  # text states of [""] + train_prompts()
    latents: tuple[torch.Tensor, torch.Tensor]  # posterior means and stds (unscaled)
    captions: list[str]  # the pool's true captions
    cap_idx: torch.Tensor  # each caption's row of `states`
    scaling: float  # the VAE's scaling factor

    def member(self, unet: UNet2DConditionModel, few_step: bool) -> FlowMember:
        """A pipeline of the frozen components, `unet` and the flow scheduler."""
        return FlowMember(flow_pipeline(self.vae, self.text_encoder, self.tokenizer, unet), few_step)


def _pool(base: Path, n: int, rng: np.random.Generator) -> _Pool:
    """1. The frozen VAE, text encoder and tokenizer of `base`; `n` training images encoded once."""
    frozen = StableDiffusionPipeline.from_pretrained(str(base), dtype=torch.float32, **NO_SAFETY_CHECKER)
    for m in (frozen.vae, frozen.text_encoder):
        m.eval().requires_grad_(False)
    mean, std, captions = encode_pool(frozen.vae, n, rng)
    prompts = [""] + data.train_prompts()
    with torch.no_grad():
        states = frozen.text_encoder(tokenize(frozen.tokenizer, prompts))[0]
    cap_idx = torch.tensor([prompts.index(c) for c in captions])
    scaling = float(frozen.vae.config.scaling_factor)
    return _Pool(
        frozen.vae, frozen.text_encoder, frozen.tokenizer, states, (mean, std), captions, cap_idx, scaling
    )


def run_flow(
    out: str | Path,
    options: RecipeOptions = RecipeOptions(),  # noqa: B008 (a frozen dataclass: immutable)
    base: str | Path = DIFFUSION_DIR,
) -> dict:
    """Run every stage, save both members under `out`, measure them; returns the recipe record.

    `base`: the pipeline folder whose VAE, text encoder and tokenizer the pair reuses, frozen, and
    whose UNet the teacher starts from.
    """
    s, seed, caption_noise = FLOW_SCHEDULES[options.schedule], options.seed, options.caption_noise
    out, rng, gen = start_run(out, options)
    base = Path(base)
    record = _Record(_settings(options, base))
    pool = _pool(base, s.n_latents, rng)
    record.lap("encode")

    start = UNet2DConditionModel.from_pretrained(str(base / "unet"), torch_dtype=torch.float32)
    attrs = caption_attributes(pool.captions)
    unet, losses = train_flow_teacher(
        start, pool.states, pool.latents, pool.cap_idx, attrs, pool.scaling, s.teacher, gen, caption_noise
    )
    teacher = pool.member(unet.eval(), few_step=False)
    save_pipeline(teacher.pipe, out / "teacher")
    extra = {"v_mse_last50": float(np.mean(losses[-50:]))}
    _eval(record, "teacher", teacher, [(25, 3.0), (25, 5.0), (4, 3.0)], s.eval_n, seed + 3, extra)
    record.lap("teacher")

    student_unet, losses = distill_flow_consistency(
        unet, pool.states, pool.latents, pool.cap_idx, pool.scaling, s.cd, gen
    )
    student = pool.member(student_unet.eval(), few_step=True)
    save_pipeline(student.pipe, out / "student")
    extra = {"loss_last50": float(np.mean(losses[-50:]))}
    _eval(record, "cd", student, [(2, 4.0), (4, 4.0), (4, 8.0)], s.eval_n, seed + 5, extra)
    record.lap("cd")

    record.data["params"] = {"teacher_unet": n_params(unet), "student_unet": n_params(student_unet)}
    record.data["bytes_on_disk"] = {m: folder_bytes(out / m) for m in ("teacher", "student")}
    record.write(out)
    measure_flow(out, n=s.quality_n, seed=seed, sweep_n=max(4, s.quality_n // 4))
    record.lap("quality")
    record.data["wall_clock_s"]["total"] = round(sum(record.data["wall_clock_s"].values()), 1)
    record.write(out)
    print(f"wall clock per stage (s): {record.data['wall_clock_s']}", flush=True)
    return record.data

"""Constructors of the toy model family: tokenizer, VAE, text encoder, UNets, schedulers, pipelines.

One place builds each component, for the recipe that trains them (`rlcm_exp.toy.runner`) and for
anything that needs a fresh, untrained member of the family. Model constructors draw their initial
weights from torch's global generator, so the order in which a caller builds them is part of a
run's reproducibility.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlcm_exp.models.hub import NO_SAFETY_CHECKER
from rlcm_exp.policies._sd import tokenize as pipeline_tokens
from rlcm_exp.tokenizer import write_clip_tokenizer
from rlcm_exp.toy import data
from rlcm_exp.toy.flow import flow_scheduler

MAX_TOKENS = 16
TEXT_DIM = 64
GUIDANCE_EMBED_DIM = 64  # time_cond_proj_dim of the LCM UNet
# The LCM's origin grid: LCMScheduler(original_inference_steps=50) samples t = 20k - 1, and
# distillation walks the same grid (rlcm_exp.toy.stages.distill_lcm).
LCD_ORIGIN_STEPS = 50
# Stable Diffusion's noise schedule, shared by both members (DDIM and LCM schedulers).
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


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
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def lcm_scheduler() -> LCMScheduler:
    """The same noise schedule with LCM's 50-step origin grid and boundary-condition scaling."""
    return LCMScheduler(**NOISE_SCHEDULE, original_inference_steps=LCD_ORIGIN_STEPS, timestep_scaling=10.0)


def _pipeline(cls: type[DiffusionPipeline], scheduler, vae, text_encoder, tokenizer, unet):  # noqa: ANN001, ANN202
    """A pipeline of `cls` over the given components, no safety checker, progress bar off."""
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe = cls(**components, **NO_SAFETY_CHECKER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:  # noqa: ANN001
    """The diffusion member (DDPO's base): the components with a DDIM scheduler."""
    return _pipeline(StableDiffusionPipeline, ddim_scheduler(), vae, text_encoder, tokenizer, unet)


def lcm_pipeline(vae, text_encoder, tokenizer, unet) -> LatentConsistencyModelPipeline:  # noqa: ANN001
    """The LCM member (RLCM's base): the components, the UNet with a guidance embedding."""
    return _pipeline(LatentConsistencyModelPipeline, lcm_scheduler(), vae, text_encoder, tokenizer, unet)


def flow_pipeline(vae, text_encoder, tokenizer, unet) -> StableDiffusionPipeline:  # noqa: ANN001
    """A toy flow member (model=toy_flow): the components with a FlowMatchEulerDiscreteScheduler, held in
    a StableDiffusionPipeline, whose folder layout and `from_pretrained` they share. No stock pipeline
    runs a velocity UNet with CLIP states: its __call__ is for VP models and refuses the flow scheduler;
    rlcm_exp.toy.flow samples it."""
    return _pipeline(StableDiffusionPipeline, flow_scheduler(), vae, text_encoder, tokenizer, unet)


def guidance_embedding(w: torch.Tensor) -> torch.Tensor:
    """The guidance embedding exactly as LatentConsistencyModelPipeline computes it (w = g - 1)."""
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, w, embedding_dim=GUIDANCE_EMBED_DIM
    )  # type: ignore[arg-type]


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as the pipelines build them (pad to model_max_length): the policies' tokenizer call."""
    return pipeline_tokens(tokenizer, prompts).input_ids


def save_pipeline(pipe: DiffusionPipeline, folder: Path) -> None:
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

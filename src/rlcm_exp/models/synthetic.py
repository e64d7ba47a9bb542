"""Random pipelines built from configs, saved in the hub layout: the tiny family of tests and smoke runs.

Nothing is downloaded: every component is constructed from a config with a fixed seed, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` path as a real model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlcm_exp.models.hub import NO_SAFETY_CHECKER
from rlcm_exp.tokenizer import write_clip_tokenizer

TINY_VERSION = "tiny-v2"
TINY_WORDS = "a an the on of in with red green blue yellow purple orange cat dog bird fish circle square triangle background".split()


def _tiny_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
    )
    unet_kwargs = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    unet = UNet2DConditionModel(**unet_kwargs)
    lcm_unet = UNet2DConditionModel(**unet_kwargs, time_cond_proj_dim=32)
    schedule = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    ddim = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    lcm = LCMScheduler(**schedule, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=False)
    return dict(text_encoder=text_encoder, vae=vae, unet=unet, lcm_unet=lcm_unet, ddim=ddim, lcm=lcm)


def build_tiny_family_folders(root: str | Path, seed: int = 0) -> Path:
    """Write a random tiny family (32 px, 4x VAE, ~0.1M-parameter UNets) in the hub layout under root.

    Written to a temporary folder and renamed into place, so concurrent builders never read a
    half-written model.
    """
    root = Path(root)
    final = root / TINY_VERSION
    if (final / "lcm" / "model_index.json").is_file():
        return final
    tmp = root / f".{TINY_VERSION}.{os.getpid()}.tmp"
    tok_folder = write_clip_tokenizer(tmp / "_tokenizer", TINY_WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(tok_folder)
    with torch.random.fork_rng():  # building must not move the caller's RNG (a cached build would not)
        parts = _tiny_components(seed, tokenizer)
    common = dict(
        vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, **NO_SAFETY_CHECKER
    )
    diffusion: Any = StableDiffusionPipeline(unet=parts["unet"], scheduler=parts["ddim"], **common)
    diffusion.save_pretrained(tmp / "diffusion")
    lcm: Any = LatentConsistencyModelPipeline(unet=parts["lcm_unet"], scheduler=parts["lcm"], **common)
    lcm.save_pretrained(tmp / "lcm")
    for member in ("diffusion", "lcm"):  # transformers 5 saves tokenizer.json only: add the slow files
        write_clip_tokenizer(tmp / member / "tokenizer", TINY_WORDS, model_max_length=16)
    shutil.rmtree(tmp / "_tokenizer")
    with contextlib.suppress(OSError):  # on failure another process won the race; its folder is complete
        tmp.rename(final)
    return final

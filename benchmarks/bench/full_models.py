"""SD-1.5-sized pipelines with random weights, written in the hub layout for `--scale full`.

The configurations are copies of the public Stable Diffusion 1.5 ones (the LCM UNet adds the
guidance embedding); the text encoder runs over a small closed vocabulary. The models are loaded
back through the same `from_pretrained` path as real ones.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from rlcm_exp.models.hub import NO_SAFETY_CHECKER
from rlcm_exp.tokenizer import write_clip_tokenizer

SD15_UNET: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# SimianLuo/LCM_Dreamshaper_v7: the same UNet with a guidance-embedding input, native 768 px
LCM_UNET_EXTRA: dict[str, Any] = {"time_cond_proj_dim": 256, "sample_size": 96}
SD15_VAE: dict[str, Any] = {  # vae/config.json
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {  # openai/clip-vit-large-patch14 text tower, as SD-1.5 ships it
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
LCM_SCHEDULE: dict[str, Any] = {  # LCMScheduler's distillation settings, as the LCM checkpoints ship them
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "clip_sample": False,
}
DDIM_SCHEDULE: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
FULL_WORDS = ["a", "an", "the", "of", "in", "on", "with", "photo", "animal", "dog", "cat", "bird", "fish"]


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **special, **SD15_TEXT))


def _pipeline(kind: str, tokenizer: CLIPTokenizer) -> Any:
    """The random pipeline of one family member: "lcm" or "diffusion"."""
    torch.manual_seed(0)
    # created in this order so the random weights stay those of earlier benchmark runs
    text_encoder = _text_encoder(tokenizer)
    parts = {"vae": diffusers.AutoencoderKL(**SD15_VAE), "text_encoder": text_encoder, "tokenizer": tokenizer}
    parts |= NO_SAFETY_CHECKER
    if kind == "lcm":
        unet = diffusers.UNet2DConditionModel(**{**SD15_UNET, **LCM_UNET_EXTRA})
        sched = diffusers.LCMScheduler(**SD_SCHEDULE, **LCM_SCHEDULE)
        return diffusers.LatentConsistencyModelPipeline(unet=unet, scheduler=sched, **parts)
    unet = diffusers.UNet2DConditionModel(**SD15_UNET)
    ddim = diffusers.DDIMScheduler(**SD_SCHEDULE, **DDIM_SCHEDULE)
    return diffusers.StableDiffusionPipeline(unet=unet, scheduler=ddim, **parts)


def build_full_member(root: Path, kind: str) -> Path:
    """Write an SD-1.5-shaped pipeline with random weights (fp16 on disk) in the hub layout; return its folder."""
    folder = root / kind
    if (folder / "model_index.json").is_file():
        return folder
    tok_dir = write_clip_tokenizer(root / f"_tokenizer_{kind}", FULL_WORDS, model_max_length=77)
    pipe = _pipeline(kind, CLIPTokenizer.from_pretrained(str(tok_dir)))
    # fp16 on disk halves the write and the read; the loader casts to model.dtype
    pipe.to(torch.float16)
    tmp = root / f".{kind}.tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 omits the slow tokenizer files
    write_clip_tokenizer(tmp / "tokenizer", FULL_WORDS, model_max_length=77)
    shutil.rmtree(tok_dir)
    tmp.rename(folder)
    del pipe
    gc.collect()
    return folder

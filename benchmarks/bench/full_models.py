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
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from rlcm_exp.models.hub import NO_SAFETY_CHECKER
from rlcm_exp.rewards.aesthetic import AestheticHead
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


# `small=True` (the GPU check's --cpu-scale): the same layouts with a few channels, so the whole path
# (hub layout on disk, local_path loading, LoRA, training) runs on a CPU in seconds
SMALL_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "sample_size": 16,
}
SMALL_VAE: dict[str, Any] = {
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "sample_size": 32,
}
SMALL_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
}
# openai/clip-vit-large-patch14, the aesthetic reward's CLIP (the LAION head takes its 768-d embedding)
CLIP_L14_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_L14_TEXT: dict[str, Any] = {**SD15_TEXT}
SMALL_CLIP_VISION: dict[str, Any] = {
    **CLIP_L14_VISION,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
SMALL_CLIP_TEXT: dict[str, Any] = {**SD15_TEXT, **SMALL_TEXT, "projection_dim": 768}


def _text_encoder(tokenizer: CLIPTokenizer, small: bool = False) -> CLIPTextModel:
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    sizes = {**SD15_TEXT, **SMALL_TEXT} if small else SD15_TEXT
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **special, **sizes))


def _pipeline(kind: str, tokenizer: CLIPTokenizer, small: bool = False) -> Any:
    """The random pipeline of one family member: "lcm" or "diffusion"."""
    torch.manual_seed(0)
    # created in this order so the random weights stay those of earlier benchmark runs
    text_encoder = _text_encoder(tokenizer, small)
    vae = diffusers.AutoencoderKL(**{**SD15_VAE, **(SMALL_VAE if small else {})})
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    parts |= NO_SAFETY_CHECKER
    unet_sizes = {**SD15_UNET, **(SMALL_UNET if small else {})}
    if kind == "lcm":
        unet = diffusers.UNet2DConditionModel(
            **{**unet_sizes, **LCM_UNET_EXTRA, **(SMALL_UNET if small else {})}
        )
        sched = diffusers.LCMScheduler(**SD_SCHEDULE, **LCM_SCHEDULE)
        return diffusers.LatentConsistencyModelPipeline(unet=unet, scheduler=sched, **parts)
    unet = diffusers.UNet2DConditionModel(**unet_sizes)
    ddim = diffusers.DDIMScheduler(**SD_SCHEDULE, **DDIM_SCHEDULE)
    return diffusers.StableDiffusionPipeline(unet=unet, scheduler=ddim, **parts)


def build_full_member(root: Path, kind: str, small: bool = False, device: str = "cpu") -> Path:
    """Write an SD-1.5-shaped pipeline with random weights (fp16 on disk) in the hub layout; return its folder.

    `small`: the same layout with a few channels (CPU tests). `device="cuda"` draws the random
    weights on the GPU (seconds instead of a minute of CPU initialisation; other values than CPU's)."""
    folder = root / kind
    if (folder / "model_index.json").is_file():
        return folder
    tok_dir = write_clip_tokenizer(root / f"_tokenizer_{kind}", FULL_WORDS, model_max_length=77)
    with torch.device(device):
        pipe = _pipeline(kind, CLIPTokenizer.from_pretrained(str(tok_dir)), small)
    # fp16 on disk halves the write and the read; the loader casts to model.dtype
    pipe.to("cpu", torch.float16)
    tmp = root / f".{kind}.tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers 5 omits the slow tokenizer files
    write_clip_tokenizer(tmp / "tokenizer", FULL_WORDS, model_max_length=77)
    shutil.rmtree(tok_dir)
    tmp.rename(folder)
    del pipe
    gc.collect()
    return folder


def build_aesthetic_reward(root: Path, small: bool = False, device: str = "cpu") -> list[str]:
    """A CLIP ViT-L/14 (random weights, hub layout) and a random LAION MLP head under `root/aesthetic`;
    return the Hydra overrides pointing `reward=aesthetic` at them (no download, no pinned sha256)."""
    folder = root / "aesthetic"
    head = folder / "head.safetensors"
    if not head.is_file():
        tmp = root / ".aesthetic.tmp"
        write_clip_tokenizer(tmp, FULL_WORDS, model_max_length=77)
        tok = CLIPTokenizer.from_pretrained(str(tmp))
        special = {k: getattr(tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        text = {**(SMALL_CLIP_TEXT if small else CLIP_L14_TEXT), "vocab_size": len(tok), **special}
        vision = SMALL_CLIP_VISION if small else CLIP_L14_VISION
        torch.manual_seed(0)
        with torch.device(device):
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768))
        model.cpu().half().save_pretrained(tmp)
        side = vision["image_size"]
        proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(tmp)
        save_file(AestheticHead().state_dict(), tmp / "head.safetensors")
        tmp.rename(folder)
        del model
        gc.collect()
    return [
        "reward.clip_model_id=null",
        f"reward.clip_local_path={folder}",
        "reward.head_url=null",
        "reward.head_sha256=null",
        f"reward.head_local_path={head}",
    ]


# ------------------------------------------------------------- SD3.5 members for the flow rows

# transformer/config.json of stabilityai/stable-diffusion-3.5-large (and -large-turbo, the same
# architecture) and -medium (MMDiT-X: dual attention in its first 13 blocks); docs/flow_memory.py
# counts their parameters from these
SD35_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "sd35_large": {
        "attention_head_dim": 64,
        "num_attention_heads": 38,
        "num_layers": 38,
        "caption_projection_dim": 2432,
        "in_channels": 16,
        "out_channels": 16,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 2048,
        "patch_size": 2,
        "pos_embed_max_size": 192,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
}
SD35_TRANSFORMERS["sd35_medium"] = {
    **SD35_TRANSFORMERS["sd35_large"],
    "num_attention_heads": 24,
    "num_layers": 24,
    "caption_projection_dim": 1536,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
}
CLIP_G_TEXT: dict[str, Any] = {  # laion/CLIP-ViT-bigG-14's text tower, SD3's text_encoder_2
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
T5_XXL: dict[str, Any] = {  # google/t5-v1_1-xxl's encoder, SD3's text_encoder_3 (the vocabulary is ours)
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
}
SD3_VAE: dict[str, Any] = {
    **SD15_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": 1024,
}
SD3_T5_LENGTH = 256  # T5 tokens SD3 encodes (its pipelines' max_sequence_length)


def _sd3_pipeline(root: Path, architecture: str, device: str) -> Any:
    """A random full-size SD3.5 pipeline (`architecture`: sd35_medium | sd35_large), drawn on `device`."""
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    from rlcm_exp.models.synthetic import sd3_pipeline, tiny_captions
    from rlcm_exp.tokenizer import write_t5_tokenizer

    clip_dir = write_clip_tokenizer(root / "_sd3_clip_tokenizer", FULL_WORDS, model_max_length=77)
    t5_dir = write_t5_tokenizer(root / "_sd3_t5_tokenizer", tiny_captions(), model_max_length=SD3_T5_LENGTH)
    tokenizer, t5_tokenizer = (
        CLIPTokenizer.from_pretrained(str(clip_dir)),
        T5Tokenizer.from_pretrained(t5_dir),
    )
    special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    with torch.device(device):
        clips = [
            CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tokenizer), **special, **sizes))
            for sizes in (SD15_TEXT, CLIP_G_TEXT)
        ]
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), pad_token_id=0, eos_token_id=1, **T5_XXL))
        transformer = diffusers.SD3Transformer2DModel(**SD35_TRANSFORMERS[architecture])
        return sd3_pipeline(
            transformer, diffusers.AutoencoderKL(**SD3_VAE), clips, tokenizer, t5, t5_tokenizer
        )


def build_full_sd3_member(root: Path, architecture: str, device: str = "cpu") -> Path:
    """Write a random full-size SD3.5 pipeline (bf16 on disk, hub layout) for the GPU check's flow rows;
    return its folder. Members built after the first share its text encoders, VAE and tokenizers
    (linked, not copied: 11 GB of T5-XXL and CLIPs written once); only the transformer is their own."""
    folder = root / architecture
    if (folder / "model_index.json").is_file():
        return folder
    first = next((root / a for a in SD35_TRANSFORMERS if (root / a / "model_index.json").is_file()), None)
    tmp = root / f".{architecture}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if first is None:
        pipe = _sd3_pipeline(root, architecture, device)
        pipe.to("cpu", torch.bfloat16)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):  # transformers 5 saves tokenizer.json only
            write_clip_tokenizer(tmp / sub, FULL_WORDS, model_max_length=77)
        shutil.copy(root / "_sd3_t5_tokenizer" / "spiece.model", tmp / "tokenizer_3" / "spiece.model")
    else:
        torch.manual_seed(0)
        with torch.device(device):
            transformer = diffusers.SD3Transformer2DModel(**SD35_TRANSFORMERS[architecture])
        transformer.to("cpu", torch.bfloat16).save_pretrained(tmp / "transformer", safe_serialization=True)
        shutil.copy(first / "model_index.json", tmp / "model_index.json")
        for part in first.iterdir():
            if part.is_dir() and part.name != "transformer":
                (tmp / part.name).symlink_to(part.resolve(), target_is_directory=True)
    tmp.rename(folder)
    gc.collect()
    return folder

"""Random pipelines built from configs, saved in the hub layout: the tiny family of tests and smoke runs.

Nothing is downloaded: every component is constructed from a config with a fixed seed, saved with
`save_pretrained`, and loaded back through the same `from_pretrained` path as a real model.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.hub import NO_SAFETY_CHECKER
from rlcm_exp.tokenizer import write_clip_tokenizer

TINY_VERSION = "tiny-v2"
TINY_WORDS = "a an the on of in with red green blue yellow purple orange cat dog bird fish circle square triangle background".split()


def _tiny_text_config(tokenizer: CLIPTokenizer, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=32,
    )


# the tiny VAE: 32 px images, a factor of 2 (two down blocks)
TINY_VAE: dict[str, Any] = dict(
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


def _tiny_schedulers() -> tuple[DDIMScheduler, LCMScheduler]:
    """SD's training schedule, as DDIM (the diffusion member) and LCM (the LCM member) schedulers."""
    schedule = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    ddim = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    lcm = LCMScheduler(**schedule, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=False)
    return ddim, lcm


def _tiny_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, layers=1))
    vae = AutoencoderKL(**TINY_VAE)
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
    ddim, lcm = _tiny_schedulers()
    return dict(text_encoder=text_encoder, vae=vae, unet=unet, lcm_unet=lcm_unet, ddim=ddim, lcm=lcm)


def _build_once(root: str | Path, version: str, write: Callable[[Path, CLIPTokenizer], None]) -> Path:
    """root/version, built by `write(tmp, tokenizer)` unless it is there already (its `lcm` member
    complete). Written to a temporary folder and renamed into place, so concurrent builders never read
    a half-written model; the caller's RNG does not move (a cached build would not move it)."""
    final = Path(root) / version
    if (final / "lcm" / "model_index.json").is_file():
        return final
    tmp = Path(root) / f".{version}.{os.getpid()}.tmp"
    tok_folder = write_clip_tokenizer(tmp / "_tokenizer", TINY_WORDS, model_max_length=16)
    with torch.random.fork_rng():
        write(tmp, CLIPTokenizer.from_pretrained(tok_folder))
    shutil.rmtree(tmp / "_tokenizer")
    missing = missing_weights(tmp)
    if missing:  # never renamed into place: every later run would fail to load it
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(
            f"building the synthetic model {final} wrote no weights for {', '.join(missing)}: a process "
            "of rank > 0 in an initialised torch.distributed group cannot save transformers models; "
            "build it before the process group starts (rlcm_exp's train does)"
        )
    try:
        tmp.rename(final)
    except OSError:  # another process won the race: its folder is complete; drop ours
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def missing_weights(folder: Path) -> list[str]:
    """The component folders under `folder` (any depth) left empty, or with a config.json but no
    weights file."""
    weights = ("*.safetensors", "*.bin")
    return sorted(
        str(d.relative_to(folder))
        for d in folder.rglob("*")
        if d.is_dir()
        and (
            not any(d.iterdir())
            or ((d / "config.json").is_file() and not any(any(d.glob(w)) for w in weights))
        )
    )


def _save_member(pipe: Any, folder: Path, tokenizers: tuple[str, ...] = ("tokenizer",)) -> None:
    pipe.save_pretrained(folder)
    for sub in tokenizers:  # transformers 5 saves tokenizer.json only: add the slow files
        write_clip_tokenizer(folder / sub, TINY_WORDS, model_max_length=16)


def build_tiny_family_folders(root: str | Path, seed: int = 0) -> Path:
    """Write a random tiny family (32 px, 4x VAE, ~0.1M-parameter UNets) in the hub layout under root."""

    def write(tmp: Path, tokenizer: CLIPTokenizer) -> None:
        parts = _tiny_components(seed, tokenizer)
        common = dict(
            vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, **NO_SAFETY_CHECKER
        )
        _save_member(
            StableDiffusionPipeline(unet=parts["unet"], scheduler=parts["ddim"], **common), tmp / "diffusion"
        )
        lcm = LatentConsistencyModelPipeline(unet=parts["lcm_unet"], scheduler=parts["lcm"], **common)
        _save_member(lcm, tmp / "lcm")

    return _build_once(root, TINY_VERSION, write)


# the layers an LCM-LoRA adapts (latent-consistency/lcm-lora-sdv1-5 covers the attention, the
# feed-forward, the resnet convolutions and the time projections), as the tiny UNet names them
TINY_LCM_LORA_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
)


def build_tiny_lcm_lora(root: str | Path, seed: int = 0) -> Path:
    """A random rank-4 LoRA on the tiny base UNet (root/diffusion), saved in the diffusers LoRA format
    under root/lcm_lora: the stand-in of an LCM-LoRA, loaded by the same `load_lora_weights` path. Both
    LoRA matrices are random (not B = 0), so fusing it changes the base's predictions."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = Path(root)
    final = root / "lcm_lora"
    if (final / "pytorch_lora_weights.safetensors").is_file():
        return final
    unet: Any = UNet2DConditionModel.from_pretrained(root / "diffusion" / "unet")
    with torch.random.fork_rng():  # building must not move the caller's RNG (a cached build would not)
        torch.manual_seed(seed + 1)
        unet.add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=list(TINY_LCM_LORA_MODULES))
        )
    tmp = root / f".lcm_lora.{os.getpid()}.tmp"
    # peft's key format (lora_A / lora_B) for every layer: diffusers' older lora.down / lora.up names
    # exist for attention layers only, and a file mixing the two loads without its attention part
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    with contextlib.suppress(OSError):  # on failure another process won the race; its folder is complete
        tmp.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


TINY_SDXL_VERSION = "tiny-sdxl-v1"


def _tiny_sdxl_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    """SDXL's layout at toy size: two CLIP text encoders (the second with a projection: the pooled
    embedding), a UNet with SDXL's added text/time conditioning, and a VAE with SDXL's scaling."""
    torch.manual_seed(seed)
    text_config = _tiny_text_config(tokenizer, layers=2)  # SDXL conditions on the penultimate layer
    encoders = CLIPTextModel(text_config), CLIPTextModelWithProjection(text_config)
    # SDXL's VAE scaling, and force_upcast as SDXL's VAE (decoded in fp32 under fp16)
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)
    unet_kwargs = dict(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=64,  # both encoders' states concatenated: 32 + 32
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled + 6 time ids x their embedding
    )
    unet = UNet2DConditionModel(**unet_kwargs)
    lcm_unet = UNet2DConditionModel(**unet_kwargs, time_cond_proj_dim=32)
    ddim, lcm = _tiny_schedulers()
    return dict(encoders=encoders, vae=vae, unet=unet, lcm_unet=lcm_unet, ddim=ddim, lcm=lcm)


def build_tiny_sdxl_folders(root: str | Path, seed: int = 0) -> Path:
    """A random tiny SDXL family (32 px) in the hub layout under root: `diffusion` (DDIM scheduler)
    and `lcm` (a guidance-embedded UNet, LCMScheduler), both StableDiffusionXLPipeline folders."""

    def write(tmp: Path, tokenizer: CLIPTokenizer) -> None:
        parts = _tiny_sdxl_components(seed, tokenizer)
        text = dict(zip(("text_encoder", "text_encoder_2"), parts["encoders"], strict=True))
        common: dict[str, Any] = dict(
            vae=parts["vae"], **text, tokenizer=tokenizer, tokenizer_2=tokenizer, add_watermarker=False
        )
        for member, unet, scheduler in (("diffusion", "unet", "ddim"), ("lcm", "lcm_unet", "lcm")):
            pipe = StableDiffusionXLPipeline(unet=parts[unet], scheduler=parts[scheduler], **common)
            _save_member(pipe, tmp / member, ("tokenizer", "tokenizer_2"))

    return _build_once(root, TINY_SDXL_VERSION, write)


# ---------------------------------------------------------------- rectified-flow transformer families

TINY_SD35_VERSION = "tiny-sd35-v1"
TINY_FLUX1_VERSION = "tiny-flux1-v1"
TINY_T5_LENGTH = 32  # T5 tokens the tiny pipelines encode (their tokenizer's model_max_length)
TINY_T5_WIDTH = 64  # the tiny T5's d_model: the width of the text states the flow transformers attend to
# the joint attention both tiny flow transformers (SD3's, FLUX's) share: 2 heads of 8 over T5's states
TINY_JOINT_ATTENTION: dict[str, Any] = dict(
    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TINY_T5_WIDTH
)


def tiny_captions() -> list[str]:
    """The few hundred captions the tiny T5 tokenizer is trained on: the tiny vocabulary's colour x
    subject x background sentences and the prompts the smoke runs use (ImageNet animals, activities)."""
    from rlcm_exp.prompts import animal_activities, imagenet_animals

    colours = "red green blue yellow purple orange".split()
    subjects = "cat dog bird fish circle square triangle".split()
    made = [f"a {c} {s} on a {b} background" for c in colours for s in subjects for b in colours[:3]]
    return made + imagenet_animals() + animal_activities()


def _tiny_t5(tokenizer_dir: Path) -> tuple[Any, Any]:
    """A 1-layer T5 encoder (d_model 64) and its offline SentencePiece tokenizer (written to tokenizer_dir)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from rlcm_exp.tokenizer import write_t5_tokenizer

    folder = write_t5_tokenizer(tokenizer_dir, tiny_captions(), model_max_length=TINY_T5_LENGTH)
    tokenizer = T5Tokenizer.from_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TINY_T5_WIDTH,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def _flow_scheduler(dynamic: bool, shift: float) -> Any:
    """FlowMatchEulerDiscreteScheduler as SD3 (static `shift`) or FLUX.1-dev (resolution-dependent
    shift, FLUX's base/max shift and sequence lengths) configure it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if dynamic:
        return FlowMatchEulerDiscreteScheduler(
            shift=shift,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The tiny VAE with 16 latent channels and the family's latent scaling and shift (SD3 / FLUX)."""
    return AutoencoderKL(
        **{**TINY_VAE, "latent_channels": 16},
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _save_flow_member(
    pipe: Any, folder: Path, clip_tokenizers: tuple[str, ...], t5_dir: Path, t5: str
) -> None:
    _save_member(pipe, folder, clip_tokenizers)
    shutil.copy(t5_dir / "spiece.model", folder / t5 / "spiece.model")  # the trained SentencePiece model


def sd3_pipeline(transformer: Any, vae: Any, clips: Any, tokenizer: Any, t5: Any, t5_tokenizer: Any) -> Any:
    """A StableDiffusion3Pipeline of these parts: both CLIPs (`clips`) share `tokenizer`, T5 third;
    SD3's scheduler with its static shift 3 (the tiny SD3.5 family and the GPU check's full-size members)."""
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(dynamic=False, shift=3.0),
        vae=vae,
        text_encoder=clips[0],
        tokenizer=tokenizer,
        text_encoder_2=clips[1],
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def build_tiny_sd35_folders(root: str | Path, seed: int = 0) -> Path:
    """A random tiny SD3.5 family (32 px) in the hub layout under root, both members
    StableDiffusion3Pipeline folders: two CLIPs with projections (states + pooled) and a T5, an
    SD3Transformer2DModel (patch 2), SD3's VAE scaling/shift and scheduler shift 3. `diffusion` is
    the many-step member (SD3.5-Large's stand-in), `lcm` the few-step one (Large-Turbo's)."""
    from diffusers import SD3Transformer2DModel

    def write(tmp: Path, tokenizer: CLIPTokenizer) -> None:
        torch.manual_seed(seed)
        text_config = _tiny_text_config(tokenizer, layers=2)  # SD3 conditions on the penultimate layer
        clips = CLIPTextModelWithProjection(text_config), CLIPTextModelWithProjection(text_config)
        t5, t5_tokenizer = _tiny_t5(tmp / "_t5")
        vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)
        transformer_kwargs = dict(
            sample_size=16,  # latent side: 32 px / VAE factor 2
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            **TINY_JOINT_ATTENTION,  # both CLIPs' states (32 + 32) are padded to T5's width
            caption_projection_dim=16,
            pooled_projection_dim=64,  # both CLIPs' pooled projections concatenated
            pos_embed_max_size=16,
        )
        for member in ("diffusion", "lcm"):
            pipe = sd3_pipeline(
                SD3Transformer2DModel(**transformer_kwargs), vae, clips, tokenizer, t5, t5_tokenizer
            )
            _save_flow_member(pipe, tmp / member, ("tokenizer", "tokenizer_2"), tmp / "_t5", "tokenizer_3")
        shutil.rmtree(tmp / "_t5")

    return _build_once(root, TINY_SD35_VERSION, write)


def build_tiny_flux1_folders(root: str | Path, seed: int = 0) -> Path:
    """A random tiny FLUX.1 family (32 px) in the hub layout under root, both members FluxPipeline
    folders: CLIP (pooled only) and T5 (states), a FluxTransformer2DModel on 2x2-packed latents with
    text and image ids, FLUX's VAE scaling/shift. `diffusion` is FLUX.1-dev's stand-in (guidance
    embedding, resolution-dependent shift), `lcm` FLUX.1-schnell's (no guidance, static shift 1)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    def write(tmp: Path, tokenizer: CLIPTokenizer) -> None:
        torch.manual_seed(seed)
        clip = CLIPTextModel(_tiny_text_config(tokenizer, layers=1))
        t5, t5_tokenizer = _tiny_t5(tmp / "_t5")
        vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)
        for member, guidance in (("diffusion", True), ("lcm", False)):
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,  # 16 latent channels x a 2x2 patch
                num_layers=1,
                num_single_layers=1,
                **TINY_JOINT_ATTENTION,
                pooled_projection_dim=32,  # CLIP's pooled output
                guidance_embeds=guidance,
                axes_dims_rope=(2, 2, 4),
            )
            pipe = FluxPipeline(
                scheduler=_flow_scheduler(dynamic=guidance, shift=3.0 if guidance else 1.0),
                vae=vae,
                text_encoder=clip,
                tokenizer=tokenizer,
                text_encoder_2=t5,
                tokenizer_2=t5_tokenizer,
                transformer=transformer,
            )
            _save_flow_member(pipe, tmp / member, ("tokenizer",), tmp / "_t5", "tokenizer_2")
        shutil.rmtree(tmp / "_t5")

    return _build_once(root, TINY_FLUX1_VERSION, write)

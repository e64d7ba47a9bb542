"""What both Stable-Diffusion-style policies share, written once: the member's modules, the
resolution check, prompt encoding, the random draws of a rollout and decoding.

lcm.py and ddim.py differ only in their schedule constants and UNet call; everything the two
pipelines (LatentConsistencyModelPipeline, StableDiffusionPipeline) do alike lives here, so the
copies cannot drift (they did: only the DDIM policy checked the resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from diffusers.utils.torch_utils import randn_tensor

from rlcm_exp.models.family import check_resolution as check_member_resolution
from rlcm_exp.models.family import check_vae_resolution
from rlcm_exp.models.hub import vae_scale
from rlcm_exp.policies.base import Generators, Policy

P = TypeVar("P", bound=Policy)


def pipeline_modules(pipe: Any) -> dict[str, Any]:
    """The modules a policy drives, taken from a loaded diffusers pipeline (keyword arguments of
    LCMPolicy / DDIMPolicy)."""
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": pipe.scheduler,
    }


def from_family(
    policy_class: type[P], family: Any, device: torch.device | str, resolution: int | None, **options: Any
) -> P:
    """`policy_class` over the family's member it drives (`policy_class.member`), loaded on `device`;
    `resolution=None` uses the member's own. The builders named by conf/sampler/ call this.
    A resolution the member's VAE cannot produce is refused before its weights load."""
    member = policy_class.member
    check_member_resolution(family, member, resolution)
    build = cast(Callable[..., P], policy_class)  # a concrete policy class: its own __init__, not Policy's
    return build(
        **pipeline_modules(family.load(member, device)),
        resolution=resolution or family.member(member).resolution,
        **options,
    )


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell along a side of a loaded VAE (rlcm_exp.models.hub.vae_scale)."""
    return vae_scale(vae.config)


# Checked again on the loaded VAE by the policies: a hub member whose config was not on this machine
# could not be checked before loading (rlcm_exp.models.family.check_resolution).
check_resolution = check_vae_resolution


@torch.no_grad()
def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """Text-encoder states, tokenised exactly as the pipelines' `encode_prompt` does (padded to the
    tokenizer's maximum length; an attention mask only for encoders configured to use one)."""
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def latent_shape(batch: int, channels: int, resolution: int, vae_scale: int) -> tuple[int, int, int, int]:
    side = resolution // vae_scale
    return (batch, channels, side, side)


def initial_latents(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device,
    dtype: torch.dtype,
    init_noise_sigma: float,
) -> torch.Tensor:
    """x_T as the pipelines draw it (first draw of `generator`, in the model's dtype, scaled by the
    scheduler's init_noise_sigma), kept in float32 from then on."""
    return (randn_tensor(shape, generator=generator, device=device, dtype=dtype) * init_noise_sigma).float()


def step_noise(
    shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The latent-shaped normal a scheduler's `step` draws (model dtype, same generator), as float32."""
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype).float()


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float32 images in [0, 1], (B, 3, H, W); the VAE runs in its own dtype."""
    vae_dtype = next(vae.parameters()).dtype
    image = vae.decode((latents / vae.config.scaling_factor).to(vae_dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def step_indices(step_index: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Per-sample step indices (B,) long on `device`, from a (B,) tensor or one int for the whole batch."""
    if isinstance(step_index, int):
        return torch.full((batch,), step_index, dtype=torch.long, device=device)
    return step_index.to(device=device, dtype=torch.long)

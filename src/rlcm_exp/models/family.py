"""Model families: a diffusion model and the LCM distilled from it, loaded the same way real or tiny.

A family names up to two members. `sampler=lcm` drives the `lcm` member, `sampler=ddim` the
`diffusion` member; a family without the member a sampler needs is refused with a clear error,
so LCM-only or diffusion-only models are fine. An LCM member may be a base with an LCM-LoRA fused
(model=sd15_lcm_lora, sdxl_lcm): RLCM and DDPO then run on the same weights underneath. A member's
native resolution and kind are read from its folder (see hub.resolve_member). Every member loads
through `from_pretrained` (hub id + revision, or a local folder in the hub layout): the tiny families
are built from configs, saved in that layout and loaded back through the very same path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.hub import (
    PIPELINES,
    AdapterSource,
    MemberSource,
    load_pipeline,
    local_vae_scale,
    resolve_member,
    torch_dtype,
)
from rlcm_exp.models.precision import load_dtype
from rlcm_exp.models.synthetic import build_tiny_family_folders, build_tiny_lcm_lora, build_tiny_sdxl_folders


@dataclass(frozen=True)
class ModelFamily:
    name: str
    diffusion: MemberSource | None = None
    lcm: MemberSource | None = None
    # dtype of the frozen weights (fp16/bf16 halves memory on a GPU); "auto": training resolves it to the
    # mixed precision's dtype on CUDA (models/precision.py), other commands load float16 on CUDA, else float32
    dtype: str = "float32"

    def member(self, kind: str) -> MemberSource:
        """The member's source, checked before loading and completed from its folder (native
        resolution when null; warnings when the configuration disagrees with the weights)."""
        source = getattr(self, kind) if kind in PIPELINES else None
        if source is None:
            sampler = "ddim" if kind == "diffusion" else "lcm"
            other = "lcm" if kind == "diffusion" else "diffusion"
            raise ConfigError(
                f"model={self.name} has no {kind} member (model.{kind} is null), but sampler={sampler} needs "
                f"one. Give the family a model.{kind} member, or use a sampler for the {other} member it has."
            )
        return resolve_member(kind, source)

    def load(self, kind: str, device: torch.device | str = "cpu") -> DiffusionPipeline:
        """Load the `kind` member ('lcm' or 'diffusion') as a diffusers pipeline on `device`."""
        return load_pipeline(kind, self.member(kind), torch_dtype(load_dtype(self.dtype, device)), device)


def check_vae_resolution(resolution: int, scale: int) -> None:
    """Refuse an image side the VAE cannot produce: the latent side is resolution / scale."""
    if resolution <= 0 or resolution % scale:
        raise ConfigError(
            f"sampler.resolution={resolution} is not a positive multiple of the VAE's factor {scale}: "
            f"use a multiple of {scale} (or null for the model's own resolution)"
        )


def check_resolution(family: ModelFamily | Any, member: str, resolution: int | None) -> None:
    """Refuse `resolution` (sampler.resolution; None: the member's own) for the family's `member`
    (a ModelFamily, or anything with its `member(kind) -> MemberSource`)
    BEFORE any weights load, reading the VAE factor from the member's vae/config.json. A member whose
    config is not on this machine (a hub id not yet downloaded) is checked by the policy after
    loading. Also refuses a family without that member."""
    source = family.member(member)
    scale = local_vae_scale(source)
    if scale is not None:
        side = source.resolution if resolution is None else resolution
        if side is not None:  # None: a hub member's native side, known once it loads
            check_vae_resolution(side, scale)


def tiny_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """Random tiny members for tests and smoke runs: nothing to download, built in well under a second."""
    root = build_tiny_family_folders(Path(cache_dir).expanduser(), seed)
    return ModelFamily(
        name="tiny",
        diffusion=MemberSource(local_path=str(root / "diffusion"), resolution=32),
        lcm=MemberSource(local_path=str(root / "lcm"), resolution=32),
    )


def tiny_sd15_lcm_lora_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """The tiny stand-in of model=sd15_lcm_lora: the tiny family's diffusion member as the base, and
    that base with a random tiny LCM-LoRA (diffusers LoRA format) fused as the LCM member; the
    resolution (32 px) is read from the folder, as for a real local checkpoint."""
    root = build_tiny_family_folders(Path(cache_dir).expanduser(), seed)
    lora = build_tiny_lcm_lora(root, seed)
    base = str(root / "diffusion")
    return ModelFamily(
        name="tiny_sd15_lcm_lora",
        diffusion=MemberSource(local_path=base),
        lcm=MemberSource(local_path=base, lcm_lora=AdapterSource(local_path=str(lora))),
    )


def tiny_sdxl_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """The tiny stand-in of model=sdxl_lcm (32 px, random): SDXL's two text encoders, pooled
    embedding, added time ids and VAE scaling; a DDIM diffusion member and a guidance-embedded LCM."""
    root = build_tiny_sdxl_folders(Path(cache_dir).expanduser(), seed)
    return ModelFamily(
        name="tiny_sdxl",
        diffusion=MemberSource(local_path=str(root / "diffusion")),
        lcm=MemberSource(local_path=str(root / "lcm")),
    )


def member_resolution(folder: Path) -> int:
    """A saved member's native image side in pixels, read from its VAE config (no weights load)."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(vae["sample_size"])

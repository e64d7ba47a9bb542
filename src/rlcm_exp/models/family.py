"""Model families: a diffusion model and the LCM distilled from it, loaded the same way real or tiny.

A family names its members: `sampler=lcm` drives the `lcm` member, `sampler=ddim` the `diffusion`
member; in a rectified-flow family (process "rectified_flow": tiny_sd35, flux1, toy_flow) the same two
slots hold the many-step flow model (`sampler=flow_sde` or `cps`) and its distilled few-step model
(`sampler=flow_consistency`). A family without the member a sampler needs is refused with a clear error,
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
from rlcm_exp.models.memory import MemoryProfile
from rlcm_exp.models.precision import load_dtype
from rlcm_exp.models.synthetic import (
    build_tiny_family_folders,
    build_tiny_flux1_folders,
    build_tiny_lcm_lora,
    build_tiny_sd35_folders,
    build_tiny_sdxl_folders,
)

# what a family's members are trained as, and the samplers that drive each process
PROCESSES = {
    "vp": "VP (epsilon) diffusion: sampler=lcm or ddim",
    "rectified_flow": "rectified flow: sampler=flow_sde, cps or flow_consistency",
}

# which samplers drive each member of a family of each process (the error for a family without the
# member names them)
MEMBER_SAMPLERS = {
    "vp": {"diffusion": "sampler=ddim", "lcm": "sampler=lcm"},
    "rectified_flow": {"diffusion": "sampler=flow_sde or cps", "lcm": "sampler=flow_consistency"},
}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    diffusion: MemberSource | None = None
    lcm: MemberSource | None = None
    # dtype of the frozen weights (fp16/bf16 halves memory on a GPU); "auto": training resolves it to the
    # mixed precision's dtype on CUDA (models/precision.py), other commands load float16 on CUDA, else float32
    dtype: str = "float32"
    process: str = (
        "vp"  # "vp" (SD 1.x/2.x, SDXL, LCM) | "rectified_flow" (SD3, FLUX, toy_flow): which samplers apply
    )
    # the memory model's figures (models/memory.py; estimates): a training call that cannot fit the
    # device is refused before any weights load. None (tiny and toy families): not estimated
    memory: MemoryProfile | None = None

    def member(self, kind: str) -> MemberSource:
        """The member's source, checked before loading and completed from its folder (native
        resolution when null; warnings when the configuration disagrees with the weights)."""
        source = getattr(self, kind) if kind in PIPELINES else None
        if source is None:
            samplers = MEMBER_SAMPLERS[self.process]
            has = [k for k in PIPELINES if getattr(self, k) is not None]
            raise ConfigError(
                f"model={self.name} has no {kind} member (model.{kind} is null), but "
                f"{samplers.get(kind, kind)} needs one. Give the family a model.{kind} member, or use "
                f"a sampler for a member it has ({', '.join(has) or 'none'}: "
                f"{'; '.join(samplers[k] for k in has) or '-'})."
            )
        return resolve_member(kind, source, self.process)

    def check_process(self, process: str, sampler: str) -> None:
        """Refuse, before any weights load, a sampler made for another process than the family's
        (a flow sampler on a VP family, or the reverse)."""
        if process != self.process:
            raise ConfigError(
                f"sampler={sampler} samples {PROCESSES[process].split(':')[0]}, but model={self.name} is "
                f"{PROCESSES[self.process]}."
            )

    def load(self, kind: str, device: torch.device | str = "cpu") -> DiffusionPipeline:
        """Load the `kind` member (a key of PIPELINES: 'lcm' or 'diffusion') as a
        diffusers pipeline on `device`."""
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


def tiny_sd35_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """The tiny stand-in of model=sd35_large (32 px, random, built offline from configs): two CLIPs
    and a T5 (offline SentencePiece tokenizer), an SD3 transformer; `diffusion` the many-step member,
    `lcm` the few-step one (SD3.5-Large-Turbo's place)."""
    root = build_tiny_sd35_folders(Path(cache_dir).expanduser(), seed)
    return ModelFamily(
        name="tiny_sd35",
        diffusion=MemberSource(local_path=str(root / "diffusion")),
        lcm=MemberSource(local_path=str(root / "lcm")),
        process="rectified_flow",
    )


def tiny_flux1_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """The tiny stand-in of model=flux1 (32 px, random, built offline from configs): CLIP pooled + T5
    states, text ids, 2x2-packed latents; `diffusion` FLUX.1-dev's place (guidance embedding),
    `lcm` FLUX.1-schnell's (no guidance)."""
    root = build_tiny_flux1_folders(Path(cache_dir).expanduser(), seed)
    return ModelFamily(
        name="tiny_flux1",
        diffusion=MemberSource(local_path=str(root / "diffusion"), resolution=32),
        lcm=MemberSource(local_path=str(root / "lcm"), resolution=32),
        process="rectified_flow",
    )


def member_resolution(folder: Path) -> int:
    """A saved member's native image side in pixels, read from its VAE config (no weights load)."""
    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(vae["sample_size"])

"""Saving what a run learned: LoRA weights in the diffusers format, written atomically.

A folder is written under a temporary name and renamed into place, so a crash or a full disk
never leaves a half-written checkpoint where a loader would read it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from rlcm_exp.errors import ConfigError


def save_lora(unet: torch.nn.Module, folder: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` so that `pipe.load_lora_weights(folder)` loads it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=state, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write the LoRA checkpoint to {folder}: {err}") from err
    return folder


def resolve_lora_folder(path: str | Path) -> Path:
    """Accept a LoRA folder, a run dir (uses checkpoints/final), or the safetensors file itself."""
    p = Path(path).expanduser()
    candidates = [p, p / "checkpoints" / "final", p.parent if p.suffix == ".safetensors" else p]
    for c in candidates:
        if (c / "pytorch_lora_weights.safetensors").is_file():
            return c
    raise ConfigError(
        f"checkpoint={path}: no pytorch_lora_weights.safetensors there. Give a run dir (its checkpoints/final "
        "is used) or a checkpoint folder written by training."
    )

"""LoRA on the UNet: attach an adapter, save it in the diffusers format, load it back.

A folder is written under a temporary name and renamed into place, so a crash or a full disk
never leaves a half-written checkpoint where a loader would read it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from rlcm_exp.errors import CheckpointError, ConfigError

UNET_PREFIX = "unet"  # the prefix of every key of a saved LoRA (StableDiffusionPipeline.save_lora_weights)
METADATA_KEY = "lora_adapter_metadata"  # the safetensors metadata entry holding the LoraConfig (JSON)


@dataclass(frozen=True)
class LoraSettings:
    """The trained adapter: rank, alpha (scale = alpha / rank), init and the UNet layers it wraps."""

    rank: int
    alpha: int
    init: Any  # peft init_lora_weights: "gaussian" | True (kaiming); B starts at 0 either way
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def attach(self, unet: Any) -> list[torch.nn.Parameter]:
        return attach_lora(unet, self.rank, self.alpha, self.init, list(self.target_modules))


def attach_lora(
    unet: Any, rank: int, alpha: int, init: Any, target_modules: list[str]
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter to its attention projections; return the trainable params (fp32)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"algo.lora.target_modules={list(target_modules)} matched no layer of the UNet")
    for p in params:  # LoRA weights train in fp32 even when the frozen base is fp16/bf16
        p.data = p.data.float()
    return params


COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every state-dict key


def uncompiled(module: Any) -> Any:
    """The module under torch.compile's wrapper(s) (memory.compile_unet): the same weights, whose
    state-dict keys lack `_orig_mod.`, so a LoRA saved from a compiled run loads into a plain UNet."""
    while isinstance(module, torch.nn.Module) and "_orig_mod" in module._modules:
        module = module._modules["_orig_mod"]
    return module


def without_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as an uncompiled module names them (files written by a compiled run before this fix)."""
    return {k.replace(COMPILED_PREFIX, ""): v for k, v in state.items()}


def lora_payload(unet: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """The UNet's LoRA in the diffusers format, plus its LoraConfig as metadata: without the metadata a
    loader assumes alpha = rank and silently rescales an adapter trained with alpha != rank. A
    compiled UNet is saved under the plain UNet's keys."""
    unet = uncompiled(unet)
    peft_state = get_peft_model_state_dict(unet)
    state = convert_state_dict_to_diffusers(peft_state)
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        # diffusers renames only some layers (attention) to lora.down / lora.up; a file mixing the
        # two formats (e.g. with proj_in) loads through load_lora_weights WITHOUT its attention part.
        # peft's names throughout load whole.
        state = peft_state
    config = unet.peft_config["default"].to_dict()
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    return state, metadata


def write_lora_weights(unet: torch.nn.Module, folder: Path) -> None:
    """Write `pytorch_lora_weights.safetensors` (with its LoraConfig) into `folder`, in place."""
    state, metadata = lora_payload(unet)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata, safe_serialization=True
    )


def write_pipeline_lora(lora_file: Path, folder: Path, transformer_pipeline: Any | None) -> None:
    """The run's LoRA (`lora_file`, saved under the `unet` prefix whatever the denoiser) written into
    `folder` as the member's stock diffusers pipeline loads it with `load_lora_weights`: a copy for a
    UNet member; for a transformer member (SD3, FLUX.1: `transformer_pipeline` is its pipeline class)
    the same tensors and LoraConfig under the `transformer` prefix, by that pipeline's save_lora_weights."""
    if transformer_pipeline is None:
        shutil.copy2(lora_file, folder / lora_file.name)
        return
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(lora_file), "pt") as handle:
        metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    state = {_unprefixed(k): v for k, v in load_file(str(lora_file)).items()}
    transformer_pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata={_unprefixed(k): v for k, v in metadata.items()} or None,
        weight_name=lora_file.name,
        safe_serialization=True,
    )


def _unprefixed(key: str) -> str:
    return key.removeprefix(f"{UNET_PREFIX}.")


def save_lora(unet: torch.nn.Module, folder: Path) -> Path:
    """Write `pytorch_lora_weights.safetensors` so that `pipe.load_lora_weights(folder)` loads it."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_lora_weights(unet, tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write the LoRA checkpoint to {folder}: {err}") from err
    return folder


def resolve_lora_folder(path: str | Path, ema: bool = False) -> Path:
    """Accept a LoRA folder, a run dir (uses checkpoints/final), or the safetensors file itself.
    With `ema`, a run dir means its EMA weights, checkpoints/final_ema (train.ema_decay)."""
    p = Path(path).expanduser()
    if ema:
        for folder in (p / "checkpoints" / "final_ema", p.parent / "final_ema"):
            if (folder / "pytorch_lora_weights.safetensors").is_file():
                return folder
        raise ConfigError(
            f"checkpoint={path} with ema=true: no checkpoints/final_ema there. Give a run dir trained with "
            "train.ema_decay set (its EMA weights are written to checkpoints/final_ema), or ema=false."
        )
    if not p.exists():
        raise ConfigError(
            f"checkpoint={path}: no such file or folder. Give a run dir (its checkpoints/final is used), a "
            "checkpoint folder written by training, or its pytorch_lora_weights.safetensors."
        )
    candidates = [p, p / "checkpoints" / "final", p.parent if p.suffix == ".safetensors" else p]
    for c in candidates:
        if (c / "pytorch_lora_weights.safetensors").is_file():
            return c
    raise ConfigError(
        f"checkpoint={path}: no pytorch_lora_weights.safetensors there. Give a run dir (its checkpoints/final "
        "is used) or a checkpoint folder written by training."
    )


def check_lora_file(path: Path) -> None:
    """Refuse a LoRA file that does not load (truncated, damaged, not safetensors, or empty), naming it:
    every tensor is read, so a cut-off file is found here and not after an export or a model load."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            for name in names:
                f.get_tensor(name)
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"{path}: the LoRA does not load ({type(err).__name__}: {str(err)[:200]}); the file is truncated "
            "or damaged. Use another checkpoint of the run (checkpoints/epoch_N) or train again."
        ) from err
    if not names:
        raise ConfigError(f"{path}: the LoRA file holds no tensors; use another checkpoint of the run.")


def load_lora_into(unet: torch.nn.Module, lora: dict[str, torch.Tensor]) -> None:
    """Copy a diffusers-format LoRA state dict (as saved above) into the UNet's existing adapter
    (compiled or not; `_orig_mod.` in a key is ignored)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    plain = without_compile_prefix({k.removeprefix("unet."): v for k, v in lora.items()})
    peft_state = convert_unet_state_dict_to_peft(plain)
    result = set_peft_model_state_dict(uncompiled(unet), peft_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(
            f"the checkpoint's LoRA does not fit this model: unexpected keys {unexpected[:3]}..."
        )

"""Loading one family member as a diffusers pipeline: a local folder or a hub id, with clear errors.

Every member, real or tiny, goes through `from_pretrained`, so the tiny family tests the same code
path as a real model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from rlcm_exp.errors import ConfigError

diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

PIPELINES = {"lcm": LatentConsistencyModelPipeline, "diffusion": StableDiffusionPipeline}
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
OFFLINE_HINT = (
    "No model hub is reachable from this machine (or HF_HUB_OFFLINE=1 is set) and the weights are not "
    "in the local cache. Download them elsewhere and set model.<member>.local_path=/path/to/folder, or "
    "use the offline models: model=toy (trained by this project, committed) or model=tiny (random, built "
    "from configs in milliseconds)."
)


@dataclass(frozen=True)
class MemberSource:
    """Where one member's weights come from: a local folder wins over the hub id."""

    hub_id: str | None = None  # e.g. "SimianLuo/LCM_Dreamshaper_v7"
    revision: str = "main"  # hub branch, tag or commit; pin a commit for reproducible runs
    local_path: str | None = None  # a folder in the diffusers pipeline layout
    resolution: int = 512  # native image side in pixels


def load_pipeline(
    kind: str, source: MemberSource, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> DiffusionPipeline:
    """Load member `kind` ('lcm' or 'diffusion') from `source` as a pipeline on `device`."""
    if source.local_path is not None:
        path = Path(source.local_path).expanduser()
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.{kind}.local_path={source.local_path}: no diffusers pipeline folder there "
                f"(expected {path / 'model_index.json'}). Point it at a folder written by "
                "pipeline.save_pretrained(), or set it to null to load model."
                f"{kind}.hub_id={source.hub_id}."
            )
        location, kwargs = str(path), {}
    elif source.hub_id is not None:
        location, kwargs = source.hub_id, {"revision": source.revision}
    else:
        raise ConfigError(f"model.{kind} needs a hub_id or a local_path (both are null).")
    try:
        pipe = PIPELINES[kind].from_pretrained(location, dtype=dtype, **NO_SAFETY_CHECKER, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # hub and file errors come in many types; all mean "not loadable"
        where = (
            f"model.{kind}.local_path={location}"
            if source.local_path
            else (f"model.{kind}.hub_id={location} (revision {source.revision})")
        )
        hint = "" if source.local_path else " " + OFFLINE_HINT
        raise ConfigError(f"could not load {where}: {type(err).__name__}: {err}.{hint}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def vae_scale(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell along a side: 2 ** (number of VAE down blocks - 1), as the pipelines
    compute it (from `vae.config` of a loaded VAE, or from its config.json)."""
    return int(2 ** (len(vae_config["block_out_channels"]) - 1))


def vae_config_file(source: MemberSource) -> Path | None:
    """The member's vae/config.json when it is on this machine: in its local folder, or a hub id's
    copy in the local hub cache (looked up without any download); None otherwise."""
    if source.local_path is not None:
        path = Path(source.local_path).expanduser() / "vae" / "config.json"
        return path if path.is_file() else None
    if source.hub_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source.hub_id, "vae/config.json", revision=source.revision)
    except Exception:  # a malformed repo id or revision: the load itself will report it
        return None
    return Path(cached) if isinstance(cached, str) else None


def local_vae_scale(source: MemberSource) -> int | None:
    """The member's VAE factor read from its config without loading any weights, or None when the
    config is not on this machine (the policy then checks the resolution after loading)."""
    path = vae_config_file(source)
    if path is None:
        return None
    try:
        return vae_scale(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: loading will say what is wrong
        return None


def torch_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"model.dtype={name} is not one of {sorted(table)}")
    return table[name]

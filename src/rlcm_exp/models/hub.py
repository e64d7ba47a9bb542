"""Loading one family member as a diffusers pipeline: a local folder or a hub id, with clear errors.

Every member, real or tiny, goes through `from_pretrained`, so the tiny family tests the same code
path as a real model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    LatentConsistencyModelPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from rlcm_exp.errors import ConfigError

log = logging.getLogger(__name__)
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

PIPELINES = {
    "lcm": LatentConsistencyModelPipeline,
    "diffusion": StableDiffusionPipeline,
}
# flow pipelines a member's model_index.json may name, loaded as themselves (no safety checker);
# an SDXL one ("XL" in the name) loads as StableDiffusionXLPipeline
NAMED_PIPELINES: dict[str, Any] = {
    "StableDiffusion3Pipeline": StableDiffusion3Pipeline,
    "FluxPipeline": FluxPipeline,
}
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
OFFLINE_HINT = (
    "No model hub is reachable from this machine (or HF_HUB_OFFLINE=1 is set) and the weights are not "
    "in the local cache. Download them elsewhere and set model.<member>.local_path=/path/to/folder, or "
    "use the offline models: model=toy (trained by this project, committed) or model=tiny (random, built "
    "from configs in milliseconds)."
)


@dataclass(frozen=True)
class AdapterSource:
    """A LoRA in the diffusers format (e.g. an LCM-LoRA): a local folder wins over the hub id."""

    hub_id: str | None = None  # e.g. "latent-consistency/lcm-lora-sdv1-5"
    revision: str = "main"  # hub branch, tag or commit; pin a commit for reproducible runs
    local_path: str | None = None  # a folder holding the LoRA file
    weight_name: str = "pytorch_lora_weights.safetensors"  # the LoRA file in the folder or repo

    def describe(self) -> str:
        """Where the adapter comes from, as a model card or an error message names it."""
        if self.local_path is not None:
            return self.local_path
        return f"{self.hub_id}@{self.revision}"


@dataclass(frozen=True)
class MemberSource:
    """Where one member's weights come from: a local folder wins over the hub id."""

    hub_id: str | None = None  # e.g. "SimianLuo/LCM_Dreamshaper_v7"
    revision: str = "main"  # hub branch, tag or commit; pin a commit for reproducible runs
    local_path: str | None = None  # a folder in the diffusers pipeline layout
    resolution: int | None = None  # native image side in pixels; None: read from the weights
    # an LCM-LoRA fused into this member's UNet on load, its scheduler swapped for an LCMScheduler
    # (the LCM member of an LCM-LoRA family is its base with the adapter fused)
    lcm_lora: AdapterSource | None = None


def _pipeline_location(kind: str, source: MemberSource) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` reads the member: a checked local folder, or a hub id at its revision."""
    if source.local_path is not None:
        path = Path(source.local_path).expanduser()
        if not (path / "model_index.json").is_file():
            raise ConfigError(
                f"model.{kind}.local_path={source.local_path}: no diffusers pipeline folder there "
                f"(expected {path / 'model_index.json'}). Point it at a folder written by "
                "pipeline.save_pretrained(), or set it to null to load model."
                f"{kind}.hub_id={source.hub_id}."
            )
        return str(path), {}
    if source.hub_id is not None:
        return source.hub_id, {"revision": source.revision}
    raise ConfigError(f"model.{kind} needs a hub_id or a local_path (both are null).")


def _not_loadable(key: str, location: str, local: bool, revision: str, err: Exception) -> ConfigError:
    where = f"{key}.local_path={location}" if local else f"{key}.hub_id={location} (revision {revision})"
    hint = "" if local else " " + OFFLINE_HINT
    return ConfigError(f"could not load {where}: {type(err).__name__}: {err}.{hint}")


def load_pipeline(
    kind: str, source: MemberSource, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> DiffusionPipeline:
    """Load member `kind` ('lcm' or 'diffusion') from `source` as a pipeline on `device`. A member
    with an `lcm_lora` is its base as a StableDiffusionPipeline, the adapter fused into the UNet and an
    LCMScheduler in place of the base's (how diffusers documents LCM-LoRA)."""
    location, kwargs = _pipeline_location(kind, source)
    try:
        pipeline_class, options = _pipeline_class(kind, source)
        pipe = pipeline_class.from_pretrained(location, dtype=dtype, **options, **kwargs)
    except ConfigError:
        raise
    except Exception as err:  # hub and file errors come in many types; all mean "not loadable"
        raise _not_loadable(f"model.{kind}", location, bool(source.local_path), source.revision, err) from err
    if source.lcm_lora is not None:
        fuse_lcm_lora(pipe, source.lcm_lora, f"model.{kind}.lcm_lora")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pipeline_class(kind: str, source: MemberSource) -> tuple[Any, dict[str, Any]]:
    """The pipeline class that loads the member, and its options: SDXL, SD3 or FLUX when the folder's
    model_index.json names that pipeline (SDXL without its watermark: the policies decode
    themselves); an LCM-LoRA member is its base as a StableDiffusionPipeline; else the kind's class."""
    index = member_config(source, "model_index.json")
    if index is None and source.local_path is None and source.hub_id is not None:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(source.hub_id, "model_index.json", revision=source.revision)
        index = json.loads(Path(path).read_text())
    class_name = str((index or {}).get("_class_name", ""))
    if "XL" in class_name:
        return StableDiffusionXLPipeline, {"add_watermarker": False}
    named = NAMED_PIPELINES.get(class_name)
    if named is not None:
        return named, {}
    if source.lcm_lora is not None:
        return StableDiffusionPipeline, NO_SAFETY_CHECKER
    if folder_kind(source) == "flow":  # the toy flow pair: StableDiffusionPipeline folders holding a
        return DiffusionPipeline, {}  # FlowMatchEulerDiscreteScheduler, loaded as the class they name
    return PIPELINES[kind], NO_SAFETY_CHECKER


def adapter_location(adapter: AdapterSource, key: str) -> tuple[str, dict[str, Any]]:
    """Where `load_lora_weights` reads an adapter; a local one must hold its LoRA file."""
    if adapter.local_path is not None:
        path = Path(adapter.local_path).expanduser()
        if not (path / adapter.weight_name).is_file():
            raise ConfigError(
                f"{key}.local_path={adapter.local_path}: no LCM-LoRA there (expected "
                f"{path / adapter.weight_name}). Download the LCM-LoRA (e.g. latent-consistency/lcm-lora-sdv1-5) "
                f"into that folder, set {key}.weight_name to its file, or set {key}.local_path=null to use "
                f"{key}.hub_id."
            )
        return str(path), {"weight_name": adapter.weight_name}
    if adapter.hub_id is None:
        raise ConfigError(
            f"{key} needs a hub_id or a local_path (both are null): the LCM member of an LCM-LoRA family is "
            "its base with the LCM-LoRA fused, e.g. hub_id=latent-consistency/lcm-lora-sdv1-5."
        )
    return adapter.hub_id, {"weight_name": adapter.weight_name, "revision": adapter.revision}


def fuse_lcm_lora(pipe: Any, adapter: AdapterSource, key: str) -> None:
    """Fuse the LCM-LoRA into the pipeline's UNet (no adapter is left behind, so the RL LoRA is the
    only one trained and saved) and swap the scheduler for an LCMScheduler of the same schedule."""
    from diffusers import LCMScheduler

    location, kwargs = adapter_location(adapter, key)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder": none are expected
    try:
        pipe.load_lora_weights(location, adapter_name="lcm_lora", **kwargs)
    except Exception as err:  # hub, file and key-mismatch errors: all mean "this LoRA does not load here"
        raise _not_loadable(key, location, adapter.local_path is not None, adapter.revision, err) from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe.fuse_lora(adapter_names=["lcm_lora"])
    pipe.unload_lora_weights()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)


def vae_scale(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell along a side: 2 ** (number of VAE down blocks - 1), as the pipelines
    compute it (from `vae.config` of a loaded VAE, or from its config.json)."""
    return int(2 ** (len(vae_config["block_out_channels"]) - 1))


def transformer_pipeline(kind: str, source: MemberSource) -> Any | None:
    """The pipeline class of a transformer member (StableDiffusion3Pipeline, FluxPipeline), as its
    model_index.json names it; None for a UNet member. Reads the folder, or the hub's model_index.json."""
    try:
        cls = _pipeline_class(kind, source)[0]
    except OSError as err:  # a hub member never downloaded here, offline: its format cannot be known
        raise ConfigError(
            f"model.{kind}: its model_index.json is not on this machine and cannot be downloaded ({err}); "
            "export where the model was trained, or with the hub reachable"
        ) from err
    return cls if cls in NAMED_PIPELINES.values() else None


def member_file(source: MemberSource, rel: str) -> Path | None:
    """The member's file `rel` (e.g. "vae/config.json") when it is on this machine: in its local
    folder, or a hub id's copy in the local hub cache (looked up without any download); else None."""
    if source.local_path is not None:
        path = Path(source.local_path).expanduser() / rel
        return path if path.is_file() else None
    if source.hub_id is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source.hub_id, rel, revision=source.revision)
    except Exception:  # a malformed repo id or revision: the load itself will report it
        return None
    return Path(cached) if isinstance(cached, str) else None


def vae_config_file(source: MemberSource) -> Path | None:
    """The member's vae/config.json when it is on this machine (see `member_file`)."""
    return member_file(source, "vae/config.json")


def member_config(source: MemberSource, rel: str) -> dict[str, Any] | None:
    """The member's JSON config `rel` when it is on this machine and readable, else None."""
    path = member_file(source, rel)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # unreadable: loading will say what is wrong
        return None
    return data if isinstance(data, dict) else None


def native_resolution(source: MemberSource) -> int | None:
    """The image side the member's UNet (or SD3 transformer) was built for: its sample_size x the VAE
    factor (SD 1.5: 64 x 8 = 512, LCM-Dreamshaper: 96 x 8 = 768, SDXL and SD3: 128 x 8 = 1024); None
    when not on this machine or not in the config (FLUX's transformer has no sample_size)."""
    unet = member_config(source, "unet/config.json") or member_config(source, "transformer/config.json")
    vae = member_config(source, "vae/config.json")
    if unet is None or vae is None or not isinstance(unet.get("sample_size"), int):
        return None
    try:
        return int(unet["sample_size"]) * vae_scale(vae)
    except (KeyError, TypeError):
        return None


def folder_kind(source: MemberSource) -> str | None:
    """The member kind its weights are: "flow" when the scheduler is a rectified-flow one
    (FlowMatch*Scheduler; many-step or few-step cannot be told from the configs), "lcm" when the UNet
    has a guidance embedding (time_cond_proj_dim) or the scheduler is an LCMScheduler, else
    "diffusion"; an LCM-LoRA makes any base an "lcm". None when the configs are not on this machine."""
    if source.lcm_lora is not None:
        return "lcm"
    unet, scheduler = (
        member_config(source, "unet/config.json"),
        member_config(source, "scheduler/scheduler_config.json"),
    )
    if str((scheduler or {}).get("_class_name", "")).startswith("FlowMatch"):
        return "flow"
    if unet is None:
        return None
    is_lcm = unet.get("time_cond_proj_dim") is not None
    return "lcm" if is_lcm or (scheduler or {}).get("_class_name") == "LCMScheduler" else "diffusion"


def member_scheduler(source: MemberSource) -> str:
    """The class name of the member's scheduler as its config says ("?" when not on this machine)."""
    return str((member_config(source, "scheduler/scheduler_config.json") or {}).get("_class_name", "?"))


def adapter_file(adapter: AdapterSource) -> Path | None:
    """The adapter's LoRA file when it is on this machine (local folder or hub cache), else None."""
    if adapter.local_path is not None:
        path = Path(adapter.local_path).expanduser() / adapter.weight_name
        return path if path.is_file() else None
    return member_file(MemberSource(hub_id=adapter.hub_id, revision=adapter.revision), adapter.weight_name)


def lora_context_width(path: Path) -> int | None:
    """The text-state width a LoRA file's cross-attention key projection takes (SD 1.5: 768, SD 2:
    1024, SDXL: 2048), read from the safetensors header without loading any weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                low = key.lower()
                is_down = "lora_a" in low or "lora.down" in low or "lora_down" in low
                if "attn2" in low and "to_k" in low and is_down:
                    return int(f.get_slice(key).get_shape()[-1])
    except Exception:  # not a readable safetensors file: loading will say what is wrong
        return None
    return None


def check_adapter_fits(source: MemberSource, key: str) -> None:
    """Refuse, before loading, an LCM-LoRA made for another architecture (an SD 1.5 LCM-LoRA on an
    SDXL base or the reverse): its cross-attention takes text states of another width."""
    assert source.lcm_lora is not None
    unet, path = member_config(source, "unet/config.json"), adapter_file(source.lcm_lora)
    width = lora_context_width(path) if path is not None else None
    base_width = (unet or {}).get("cross_attention_dim")
    if width is None or not isinstance(base_width, int) or width == base_width:
        return
    names = {768: "SD 1.5", 1024: "SD 2.x", 2048: "SDXL"}
    raise ConfigError(
        f"{key}.lcm_lora={source.lcm_lora.describe()} was made for a UNet with {width}-wide text states "
        f"({names.get(width, 'another architecture')}), but the base {source.local_path or source.hub_id} "
        f"takes {base_width} ({names.get(base_width, 'another architecture')}). Use the LCM-LoRA of the base's "
        "architecture: latent-consistency/lcm-lora-sdv1-5 for SD 1.5, latent-consistency/lcm-lora-sdxl for SDXL."
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:  # a member is resolved several times per run; say it once
        _WARNED.add(message)
        log.warning(message)


def resolve_member(kind: str, source: MemberSource, process: str = "vp") -> MemberSource:
    """Check member `kind` before any weights load and read what the folder says about itself: a
    local folder must be a pipeline, an LCM-LoRA belongs to the LCM member, and a null resolution is
    the folder's native one. A rectified-flow folder in a VP family's diffusion or lcm slot, or a VP
    folder in any slot of a `rectified_flow` family (tiny_sd35, toy_flow) is refused; a configured resolution or VP slot that otherwise disagrees with the
    weights is kept, with a warning."""
    flow_slot = process == "rectified_flow"
    if source.local_path is not None:
        _pipeline_location(kind, source)  # refuses a folder that is not a pipeline
    if source.lcm_lora is not None:
        if kind != "lcm":
            raise ConfigError(
                f"model.{kind}.lcm_lora is set, but an LCM-LoRA makes the LCM member: set it on model.lcm "
                f"(the base with the LCM-LoRA fused) and null on model.{kind}."
            )
        adapter_location(source.lcm_lora, f"model.{kind}.lcm_lora")  # refuses a missing local LoRA
        check_adapter_fits(source, f"model.{kind}")
    found = folder_kind(source)
    if found is not None and (found == "flow") != flow_slot:
        where = source.local_path or source.hub_id
        family = "a rectified_flow family" if found == "flow" else "a VP family"
        raise ConfigError(
            f"model.{kind} ({where}) is a {'rectified-flow' if found == 'flow' else 'VP diffusion'} model "
            f"(scheduler {member_scheduler(source)}), which model.{kind} of a {process} family cannot hold: "
            f"make it a member of {family} (process: {'rectified_flow' if found == 'flow' else 'vp'})"
        )
    if found is not None and found != kind and not flow_slot:
        where = source.local_path or source.hub_id
        _warn_once(
            f"model.{kind} ({where}) looks like a {found} model (UNet time_cond_proj_dim / scheduler class), "
            f"not a {kind} one; it is used as model.{kind} as configured"
        )
    native = native_resolution(source)
    if source.resolution is None:
        return replace(source, resolution=native) if native is not None else source
    if native is not None and native != source.resolution:
        _warn_once(
            f"model.{kind}.resolution={source.resolution}, but the weights' native side is {native} px "
            "(UNet sample_size x VAE factor); the configured value is used"
        )
    return source


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

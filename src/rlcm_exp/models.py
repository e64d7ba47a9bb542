"""Model families: a diffusion model and the LCM distilled from it, loaded the same way real or tiny.

A family names up to two members. `sampler=lcm` drives the `lcm` member, `sampler=ddim` the
`diffusion` member; a family without the member a sampler needs is refused with a clear error,
so LCM-only or diffusion-only models are fine. Every member loads through `from_pretrained`
(hub id + revision, or a local folder in the hub layout): the tiny family is built from configs,
saved in that layout and loaded back through the very same path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.utils import logging as transformers_logging

from rlcm_exp.errors import ConfigError
from rlcm_exp.tokenizer import write_clip_tokenizer

diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()

_PIPELINES = {"lcm": LatentConsistencyModelPipeline, "diffusion": StableDiffusionPipeline}
_NO_SAFETY = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
_OFFLINE_HINT = (
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


@dataclass(frozen=True)
class ModelFamily:
    name: str
    diffusion: MemberSource | None = None
    lcm: MemberSource | None = None
    dtype: str = "float32"  # dtype of the frozen weights (fp16/bf16 halves memory on a GPU)

    def member(self, kind: str) -> MemberSource:
        source = getattr(self, kind) if kind in _PIPELINES else None
        if source is None:
            sampler = "ddim" if kind == "diffusion" else "lcm"
            other = "lcm" if kind == "diffusion" else "diffusion"
            raise ConfigError(
                f"model={self.name} has no {kind} member (model.{kind} is null), but sampler={sampler} needs "
                f"one. Give the family a model.{kind} member, or use a sampler for the {other} member it has."
            )
        return source

    def load(self, kind: str, device: torch.device | str = "cpu") -> DiffusionPipeline:
        """Load the `kind` member ('lcm' or 'diffusion') as a diffusers pipeline on `device`."""
        source = self.member(kind)
        dtype = _dtype(self.dtype)
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
            pipe = _PIPELINES[kind].from_pretrained(location, dtype=dtype, **_NO_SAFETY, **kwargs)
        except ConfigError:
            raise
        except Exception as err:  # hub and file errors come in many types; all mean "not loadable"
            where = (
                f"model.{kind}.local_path={location}"
                if source.local_path
                else (f"model.{kind}.hub_id={location} (revision {source.revision})")
            )
            hint = "" if source.local_path else " " + _OFFLINE_HINT
            raise ConfigError(f"could not load {where}: {type(err).__name__}: {err}.{hint}") from err
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ConfigError(f"model.dtype={name} is not one of {sorted(table)}")
    return table[name]


def hub_family(
    name: str, diffusion: MemberSource | None, lcm: MemberSource | None, dtype: str = "float32"
) -> ModelFamily:
    return ModelFamily(name=name, diffusion=diffusion, lcm=lcm, dtype=dtype)


# ----------------------------------------------------------------------------- tiny family

TINY_VERSION = "tiny-v2"
TINY_WORDS = "a an the on of in with red green blue yellow purple orange cat dog bird fish circle square triangle background".split()


def _tiny_components(seed: int, tokenizer: CLIPTokenizer) -> dict:
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=32,
        )
    )
    vae = AutoencoderKL(
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
    schedule = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    ddim = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    lcm = LCMScheduler(**schedule, original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=False)
    return dict(text_encoder=text_encoder, vae=vae, unet=unet, lcm_unet=lcm_unet, ddim=ddim, lcm=lcm)


def build_tiny_family_folders(root: str | Path, seed: int = 0) -> Path:
    """Write a random tiny family (32 px, 4x VAE, ~0.1M-parameter UNets) in the hub layout under root.

    Written to a temporary folder and renamed into place, so concurrent builders never read a
    half-written model.
    """
    root = Path(root)
    final = root / TINY_VERSION
    if (final / "lcm" / "model_index.json").is_file():
        return final
    tmp = root / f".{TINY_VERSION}.{os.getpid()}.tmp"
    tok_folder = write_clip_tokenizer(tmp / "_tokenizer", TINY_WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(tok_folder)
    with torch.random.fork_rng():  # building must not move the caller's RNG (a cached build would not)
        parts = _tiny_components(seed, tokenizer)
    common = dict(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer, **_NO_SAFETY)
    diffusion: Any = StableDiffusionPipeline(unet=parts["unet"], scheduler=parts["ddim"], **common)
    diffusion.save_pretrained(tmp / "diffusion")
    lcm: Any = LatentConsistencyModelPipeline(unet=parts["lcm_unet"], scheduler=parts["lcm"], **common)
    lcm.save_pretrained(tmp / "lcm")
    for member in ("diffusion", "lcm"):  # transformers 5 saves tokenizer.json only: add the slow files
        write_clip_tokenizer(tmp / member / "tokenizer", TINY_WORDS, model_max_length=16)
    shutil.rmtree(tmp / "_tokenizer")
    with contextlib.suppress(OSError):  # on failure another process won the race; its folder is complete
        tmp.rename(final)
    return final


def tiny_family(cache_dir: str, seed: int = 0) -> ModelFamily:
    """Random tiny members for tests and smoke runs: nothing to download, built in well under a second."""
    root = build_tiny_family_folders(Path(cache_dir).expanduser(), seed)
    return ModelFamily(
        name="tiny",
        diffusion=MemberSource(local_path=str(root / "diffusion"), resolution=32),
        lcm=MemberSource(local_path=str(root / "lcm"), resolution=32),
    )


# ----------------------------------------------------------------------------- toy family

TOY_WEIGHTS = Path(__file__).parent / "toy" / "weights"


def toy_family(weights_dir: str | None = None) -> ModelFamily:
    """The toy world's trained members (committed under src/rlcm_exp/toy/weights, see `make toy-model`)."""
    root = Path(weights_dir).expanduser() if weights_dir else TOY_WEIGHTS
    if not (root / "lcm" / "model_index.json").is_file():
        raise ConfigError(
            f"model=toy: no toy weights in {root} (expected lcm/ and diffusion/ pipeline folders). "
            "Rebuild them with `make toy-model`, or use model=tiny."
        )
    return ModelFamily(
        name="toy",
        diffusion=MemberSource(
            local_path=str(root / "diffusion"), resolution=_resolution(root / "diffusion")
        ),
        lcm=MemberSource(local_path=str(root / "lcm"), resolution=_resolution(root / "lcm")),
    )


def _resolution(folder: Path) -> int:
    import json

    vae = json.loads((folder / "vae" / "config.json").read_text())
    return int(vae["sample_size"])


# ----------------------------------------------------------------------------- LoRA


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


def adam8bit(params: Any, lr: float, betas: tuple[float, float], weight_decay: float, eps: float) -> Any:
    """bitsandbytes' 8-bit Adam, with a clear error where it is not installed (it needs CUDA)."""
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConfigError(
            "optimizer=adam8bit needs bitsandbytes (CUDA only): `pip install bitsandbytes`, or use optimizer=adam"
        ) from err
    return bnb.optim.Adam8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)

"""A run's numerical precision, resolved once before anything loads: accelerate's mixed precision,
the frozen weights' dtype (model.dtype) and TF32, from the config, the device and the launcher.

The combinations that train correctly (the LoRA itself always trains in float32):

    model.dtype   mixed_precision   what runs
    float32       no                fp32 throughout (CPU default; fixed-seed results)
    float32       fp16 | bf16       autocast over fp32 weights (recast on every call: slower)
    float16       fp16              fp16 weights and autocast, loss-scaled gradients (CUDA default)
    bfloat16      bf16              bf16 weights and autocast

Refused: float16 weights without fp16 autocast (mixed_precision=no trains in pure fp16 without loss
scaling, so per-element gradients of ~1e-6 underflow; bf16 autocast over fp16 weights rounds twice and
fails on a CPU) and bfloat16 weights without bf16 autocast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from rlcm_exp.errors import ConfigError

MIXED = ("no", "fp16", "bf16")
WEIGHTS_OF = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}  # model.dtype=auto on CUDA
VALID = {"float32": MIXED, "float16": ("fp16",), "bfloat16": ("bf16",)}
LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch --mixed_precision X` sets


@dataclass(frozen=True)
class Precision:
    """The resolved precision of one run."""

    mixed_precision: str  # accelerate's: no | fp16 | bf16
    model_dtype: str | None  # frozen weights: float32 | float16 | bfloat16; None: the family has no key
    tf32: bool  # TF32 matmuls and convolutions (CUDA only; always False on a CPU)


def valid_combinations() -> str:
    return "; ".join(f"model.dtype={d} with mixed_precision={'|'.join(m)}" for d, m in VALID.items())


def launcher_precision(
    configured: str, env: Mapping[str, str] | None = None, name: str = "mixed_precision"
) -> str:
    """The mixed precision after `accelerate launch --mixed_precision X`: the launcher's X replaces
    `auto`; an explicit, different value is refused. The launcher's `no` is accelerate's default (set
    without the flag too), so it is no request."""
    launched = (os.environ if env is None else env).get(LAUNCHER_ENV, "").lower()
    if launched in ("", "no"):
        return configured
    if launched not in MIXED:
        raise ConfigError(
            f"accelerate launch --mixed_precision {launched}: this project runs {'|'.join(MIXED)}"
        )
    if configured not in ("auto", launched):
        raise ConfigError(
            f"{name}={configured} but accelerate launch --mixed_precision {launched}: give one of them "
            f"(leave {name}=auto to use the launcher's, or launch with --mixed_precision {configured})"
        )
    return launched


def resolve_precision(
    mixed_precision: str,
    model_dtype: str | None,
    cuda: bool,
    tf32: bool = True,
    env: Mapping[str, str] | None = None,
) -> Precision:
    """mixed_precision auto: fp16 on CUDA, no on a CPU (as in the paper); model.dtype auto: the mixed
    precision's dtype on CUDA, float32 on a CPU. A refused combination is one ConfigError line."""
    mixed = launcher_precision(mixed_precision, env)
    if mixed == "auto":
        mixed = "fp16" if cuda else "no"
    if mixed not in MIXED:
        raise ConfigError(f"mixed_precision={mixed} is not one of auto|{'|'.join(MIXED)}")
    if mixed == "fp16" and not cuda:  # accelerate would run fp32 or fail later: refused, never silent
        raise ConfigError(
            "mixed_precision=fp16 needs a CUDA GPU, and this run goes on the CPU; use mixed_precision=no "
            "(or auto: fp16 on CUDA, none on a CPU), or bf16."
        )
    dtype = model_dtype
    if dtype == "auto":
        dtype = WEIGHTS_OF[mixed] if cuda else "float32"
    if dtype is not None and mixed not in VALID.get(dtype, ()):
        raise ConfigError(
            f"model.dtype={dtype} with mixed_precision={mixed} does not train correctly; valid: "
            f"{valid_combinations()}"
        )
    return Precision(mixed, dtype, tf32 and cuda)


def apply_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions (10-bit mantissa, ~8x the fp32 rate on Ampere
    and later); precision=high lets torch pick TF32 where allowed."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def load_dtype(name: str, device: torch.device | str) -> str:
    """A family's model.dtype at load time, outside training (sample, evaluate, export: no autocast):
    `auto` is float16 on CUDA, float32 elsewhere."""
    if name != "auto":
        return name
    return "float16" if torch.device(device).type == "cuda" else "float32"

"""Optimizer builders that need more than `torch.optim`'s constructors (referenced by conf/optimizer/).

A builder may carry `check_available()`: validation.check_before_loading calls it, so a missing
dependency is one line before any model loads, not an error after the weights are in memory.
"""

from __future__ import annotations

from typing import Any

from rlcm_exp.errors import ConfigError


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConfigError(
            "optimizer=adam8bit needs bitsandbytes, not a dependency of this project: `pip install "
            "bitsandbytes` (>= 0.45 also runs on the CPU), or use optimizer=adam"
        ) from err
    return bnb


def adam8bit(params: Any, lr: float, betas: tuple[float, float], weight_decay: float, eps: float) -> Any:
    """bitsandbytes' 8-bit Adam: both moments in 8 bits (block-wise quantised) for tensors of 4096
    values or more, in float32 below that. Only the LoRA has optimizer state, so it saves tens of MB."""
    bnb = _bitsandbytes()
    return bnb.optim.Adam8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


adam8bit.check_available = _bitsandbytes  # type: ignore[attr-defined]

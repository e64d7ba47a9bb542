"""Optimizer builders that need more than `torch.optim`'s constructors (referenced by conf/optimizer/)."""

from __future__ import annotations

from typing import Any

from rlcm_exp.errors import ConfigError


def adam8bit(params: Any, lr: float, betas: tuple[float, float], weight_decay: float, eps: float) -> Any:
    """bitsandbytes' 8-bit Adam, with a clear error where it is not installed (it needs CUDA)."""
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError as err:
        raise ConfigError(
            "optimizer=adam8bit needs bitsandbytes (CUDA only): `pip install bitsandbytes`, or use optimizer=adam"
        ) from err
    return bnb.optim.Adam8bit(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)

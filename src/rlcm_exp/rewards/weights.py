"""Loading a downloaded weight file into a module built in code: tensors only (a .pth from the
internet is a pickle, so `torch.load(weights_only=True)`; or safetensors), the keys and shapes
checked, every failure a ConfigError that says what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

from rlcm_exp.errors import ConfigError

M = TypeVar("M", bound=torch.nn.Module)


def read_state_dict(path: Path, what: str) -> dict[str, Any]:
    """The tensors of a torch.save'd file (tensors only, mapped to the CPU) or a safetensors file."""
    try:
        if path.suffix == ".safetensors":
            return dict(load_file(str(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"{what} {path} is not a tensors-only torch file or safetensors file: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict):
        raise ConfigError(f"{what} {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_state_into(module: M, path: Path, what: str) -> M:
    """`module` with the weights of `path` (all keys, matching shapes), in eval mode and frozen."""
    state = read_state_dict(path, what)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        shapes = [f"{k} {tuple(v.shape)}" for k, v in module.state_dict().items()]
        expected = ", ".join(shapes[:12]) + (f", ... ({len(shapes)} tensors)" if len(shapes) > 12 else "")
        raise ConfigError(f"{what} {path} does not fit (expected {expected}): {err}") from err
    return module.eval().requires_grad_(False)

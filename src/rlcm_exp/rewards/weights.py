"""Single weight files: fetching one file of a hub repo by id and revision (or from a local folder),
checked against a pinned sha256; and loading a weight file into a module built in code, tensors
only (a .pth from the internet is a pickle, so `torch.load(weights_only=True)`; or safetensors),
keys and shapes checked. Every failure is a ConfigError that says what to set or what was expected."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.hub import load_pretrained

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


def load_state_into(
    module: M,
    path: Path,
    what: str,
    entry: str | None = None,
    rename: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> M:
    """`module` with the weights of `path` (all keys, matching shapes), in eval mode and frozen.

    `entry`: the key under which the file keeps its state dict (a training checkpoint's
    "state_dict"), or None when the file is the state dict itself. `rename`: maps the file's
    state dict to `module`'s key names (and drops what `module` does not hold), when they differ.
    """
    state = read_state_dict(path, what)
    if entry is not None:
        if not isinstance(state.get(entry), dict):
            raise ConfigError(f"{what} {path} has no {entry!r} state dict (its keys: {sorted(state)[:8]})")
        state = state[entry]
    if rename is not None:
        state = rename(state)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        shapes = [f"{k} {tuple(v.shape)}" for k, v in module.state_dict().items()]
        expected = ", ".join(shapes[:12]) + (f", ... ({len(shapes)} tensors)" if len(shapes) > 12 else "")
        raise ConfigError(f"{what} {path} does not fit (expected {expected}): {err}") from err
    return module.eval().requires_grad_(False)


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_file(
    model_id: str | None, revision: str, local_path: str | None, filename: str, sha256: str | None, key: str
) -> Path:
    """One file of a hub repo: `local_path/filename` if a local folder is given, else downloaded (or
    found in the Hugging Face cache) from `model_id` at `revision`; checked against `sha256` unless
    that is None. `key` is the config key prefix, e.g. "reward.hps_" (hps_model_id, hps_local_path)."""

    def fetch(location: str, revision: str | None = None) -> Path:
        if revision is None:  # load_pretrained passes no revision for a local folder
            path = Path(location) / filename
            if not path.is_file():
                raise FileNotFoundError(f"no {filename} in this folder")
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(location, filename, revision=revision))

    path = load_pretrained(fetch, model_id=model_id, revision=revision, local_path=local_path, key=key)
    if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
        raise ConfigError(
            f"{path} has sha256 {actual}, but {key}sha256={sha256}: it is not the pinned file and was not used. "
            f"Fix {key}revision or {key}local_path, or set {key}sha256=null to use it unpinned."
        )
    return path

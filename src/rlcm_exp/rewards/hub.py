"""Loading the pretrained parts of model-based rewards (CLIP, aesthetic, BERTScore, LLaVA) one way:
a hub id + revision, or a local folder in the hub layout, with every failure turned into a
ConfigError that names the key to set.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, TypeVar

import torch
from transformers.utils import logging as transformers_logging

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_declared

transformers_logging.disable_progress_bar()

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_OFFLINE_HINT = (
    "No model hub is reachable from this machine (or HF_HUB_OFFLINE=1 is set) and the files are not in "
    "the local Hugging Face cache. Download the model elsewhere (e.g. `hf download {model_id}`) and set "
    "{local_key}=/path/to/folder (a folder written by save_pretrained or a hub snapshot)."
)

T = TypeVar("T")


def torch_dtype(name: str | torch.dtype, key: str = "reward.dtype") -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype; anything else is a ConfigError."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ConfigError(f"{key}={name} is not a supported dtype; use one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


class ModelRuntime(TypedDict, total=False):
    """Where and how a model-based reward runs: the keys every one of them takes, declared once.
    Builders accept them as `**runtime: Unpack[ModelRuntime]` and read them with `runtime_settings`."""

    dtype: str  # reward.dtype: the reward model's weights, float32 | float16 | bfloat16
    device: str  # reward.device: where it runs (cpu, cuda, cuda:1); the trainer passes its own unless set
    batch_size: int  # reward.batch_size: images per reward forward, PER PROCESS


def runtime_settings(
    runtime: ModelRuntime, batch_size: int = 32, dtype: str = "float32", declared: type = ModelRuntime
) -> tuple[str, str, int]:
    """(dtype, device, batch_size) from a builder's runtime keywords, `batch_size` and `dtype` being the
    builder's defaults. A keyword that `declared` (ModelRuntime, or a TypedDict extending it that the
    builder takes) does not declare is the user's typo: a ConfigError naming it."""
    check_declared(runtime, declared, "runtime")
    return (
        runtime.get("dtype", dtype),
        runtime.get("device", "cpu"),
        runtime.get("batch_size", batch_size),
    )


def existing_path(local_path: str, key: str, folder: bool, advice: str) -> Path:
    """`local_path` expanded, if it is a folder (folder=True) or a file; else a ConfigError naming `key`."""
    path = Path(local_path).expanduser()
    if not (path.is_dir() if folder else path.is_file()):
        kind = "folder" if folder else "file"
        raise ConfigError(f"{key}={local_path}: no such {kind}. {advice}")
    return path


def load_pretrained(
    loader: Callable[..., T],
    *,
    model_id: str | None,
    revision: str,
    local_path: str | None,
    key: str,
    **kwargs: Any,
) -> T:
    """Call `loader(location, ...)` (a `from_pretrained`) on a local folder if given, else on the hub id.

    `key` is the config key prefix the user sets, e.g. "reward.clip_" gives the messages
    "reward.clip_model_id" and "reward.clip_local_path". Hub and file errors come in many types
    (OSError, HTTP errors, JSON errors, missing keys); all of them mean "not loadable here", so all
    become one ConfigError that says which key to set.
    """
    local_key, id_key = f"{key}local_path", f"{key}model_id"
    if local_path is not None:
        advice = (
            "Point it at a folder in the Hugging Face hub layout (written by save_pretrained, or a "
            f"downloaded snapshot), or set it to null to load {id_key}={model_id}."
        )
        location, extra = str(existing_path(local_path, local_key, True, advice)), {}
    elif model_id is not None:
        location, extra = model_id, {"revision": revision}
    else:
        raise ConfigError(f"{id_key} and {local_key} are both null; set one of them.")
    try:
        return loader(location, **extra, **kwargs)
    except Exception as err:
        if local_path is not None:
            where, hint = f"{local_key}={location}", ""
        else:
            where = f"{id_key}={location} (revision {revision})"
            hint = " " + _OFFLINE_HINT.format(model_id=location, local_key=local_key)
        # first line only: hub errors run to several lines of advice that does not apply here
        reason = (str(err).strip().splitlines() or [""])[0].rstrip(".")
        raise ConfigError(f"could not load {where}: {type(err).__name__}: {reason}.{hint}") from err


class HubSource(NamedTuple):
    """Where one pretrained part comes from: a hub id at a revision, or a local folder in the hub layout
    (used instead when set), and the config key prefix the user sets them with (e.g. "reward.clip_")."""

    model_id: str | None
    revision: str
    local_path: str | None
    key: str = "reward."

    def load(self, loader: Callable[..., T], **kwargs: Any) -> T:
        """`loader` (a `from_pretrained`) on this source, through `load_pretrained`."""
        return load_pretrained(
            loader,
            model_id=self.model_id,
            revision=self.revision,
            local_path=self.local_path,
            key=self.key,
            **kwargs,
        )

    def describe(self) -> str:
        """What /health and logs report for the part loaded from here."""
        return describe_source(self.model_id, self.revision, self.local_path)


def load_with_processor(
    model_loader: Callable[..., Any], processor_loader: Callable[..., Any], source: HubSource, dtype: str
) -> tuple[Any, Any, str]:
    """A model and its tokenizer/processor from one source; returns (model, processor, description)."""
    processor = source.load(processor_loader)
    model = source.load(model_loader, dtype=torch_dtype(dtype))
    return model, processor, source.describe()


def describe_source(model_id: str | None, revision: str, local_path: str | None) -> str:
    """What /health and logs report for one loaded model."""
    return f"{local_path} (local)" if local_path else f"{model_id}@{revision}"


def describe_hub_file(
    model_id: str | None, revision: str, local_path: str | None, filename: str, sha256: str | None
) -> str:
    """What /health and logs report for one file of a hub repo (rewards/weights.py's `hub_file`)."""
    pin = f" sha256={sha256}" if sha256 else ""
    return f"{describe_source(model_id, revision, local_path)}/{filename}{pin}"


def describe_download(url: str | None, sha256: str | None, local_path: str | None) -> str:
    """What /health and logs report for one file fetched from a pinned URL (or a local copy)."""
    return f"{local_path} (local)" if local_path else f"{url} sha256={sha256}"


class HoldsModel:
    """`device` and `dtype` of a scorer: those of its model's (first) parameters."""

    model: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

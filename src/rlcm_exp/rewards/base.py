"""What every reward shares: the calling contract, the one builder, the one output normaliser and
the one float -> uint8 image conversion. Training, evaluation, the reward server and `weighted`
all go through these, so a reward that works in one place works in all four.

    reward(images, prompts) -> (B,) scores, or {"reward": (B,), "<component>": (B,), ...}
      images:  (B, 3, H, W) float in [0, 1], on any device (the policy's)
      prompts: the B prompts the images were sampled for

Scores may be a tensor, a numpy array or a list; `as_reward_dict` turns either form into float32
CPU tensors. Rewards must be thread-safe: the trainer scores one sampling batch in a worker
thread while the next batch samples, and the reward server scores on its own thread.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np
import torch
from PIL import Image

from rlcm_exp.errors import ConfigError, find_config_error

RewardOutput: TypeAlias = torch.Tensor | np.ndarray | Sequence[float] | Mapping[str, Any]


class RewardFn(Protocol):
    """A reward: (B, 3, H, W) images in [0, 1] and B prompts -> B scores (or a dict with "reward")."""

    def __call__(self, images: torch.Tensor, prompts: list[str], /) -> RewardOutput: ...


# ----------------------------------------------------------------------------- building


def _target(reward_cfg: Any) -> Any:
    """The callable a reward config's `_target_` names; an unimportable one is the user's config error."""
    from hydra.utils import get_method

    target = str(reward_cfg["_target_"])
    try:
        return get_method(target)
    except Exception as err:  # ImportError, AttributeError, ValueError: all "no such callable"
        raise ConfigError(f"reward._target_={target} cannot be imported: {err}") from err


def build_reward(reward_cfg: Any, device: torch.device | str | None = None) -> RewardFn:
    """The one reward builder (trainer, evaluation, reward server and `weighted` components).

    `reward_cfg` is a config (DictConfig or mapping) whose `_target_` names either
    - a builder that returns the reward callable; it gets `device` (as a string) when it has a
      `device` parameter, unless the config sets one itself or `device` is None; or
    - a plain reward function `fn(images, prompts, **options)`: the other keys are bound to it
      and it is called for every batch.
    A ConfigError raised while building comes out as itself, not wrapped in Hydra's exception,
    so entry points print it as one paragraph.
    """
    if "_target_" not in reward_cfg:
        raise ConfigError(
            "the reward config has no _target_; pick one with reward=NAME (a file in conf/reward/) or set "
            "reward._target_=my_module.my_reward."
        )
    target = _target(reward_cfg)
    name = f"reward._target_={reward_cfg['_target_']}"
    user = not str(reward_cfg["_target_"]).startswith("rlcm_exp.")  # checked against the contract by name
    params = inspect.signature(target).parameters
    if {"images", "prompts"} <= set(params):  # a user's reward function: bind its options, call it later
        bound = functools.partial(target, **_options(reward_cfg))
        return CheckedReward(bound, name) if user else bound
    extra = (
        {"device": str(device)}
        if device is not None and "device" in keywords(target) and "device" not in reward_cfg
        else {}
    )
    from hydra.utils import instantiate

    try:
        reward = instantiate(reward_cfg, **extra)
    except Exception as err:
        # a user's mistake should read as one paragraph naming the key, not as a Hydra traceback
        if (config_error := find_config_error(err)) is not None:
            raise config_error from err
        raise
    if not callable(reward):
        raise ConfigError(
            f"reward._target_={reward_cfg['_target_']} built a {type(reward).__name__}, not a callable "
            "(images, prompts) -> rewards"
        )
    return CheckedReward(reward, name) if user else reward


def keywords(target: Callable[..., Any]) -> set[str]:
    """The keyword names `target` takes: its parameters, and the keys of a TypedDict it takes as
    `**kwargs: Unpack[...]` (the model rewards' shared runtime settings, rewards.hub.ModelRuntime)."""
    params = inspect.signature(target).parameters
    names = {name for name, p in params.items() if p.kind is not p.VAR_KEYWORD}
    for name, p in params.items():
        hint = typing.get_type_hints(target).get(name) if p.kind is p.VAR_KEYWORD else None
        if typing.get_origin(hint) is typing.Unpack:
            names |= set(typing.get_args(hint)[0].__annotations__)
    return names


def check_declared(given: Mapping[str, Any], declared: type, what: str) -> None:
    """A keyword in `given` that the TypedDict `declared` does not declare is the user's typo: a
    ConfigError naming it and the reward's `what` settings (a builder's `**kwargs: Unpack[declared]`)."""
    unknown = sorted(set(given) - set(declared.__annotations__))
    if unknown:
        raise ConfigError(
            f"reward.{unknown[0]} is not a setting of this reward; its {what} settings are "
            f"{sorted(declared.__annotations__)} (see the reward's YAML in conf/reward/ for the others)"
        )


def _options(reward_cfg: Any) -> dict[str, Any]:
    """The keys of a reward config other than Hydra's own (`_target_`, `_recursive_`, ...), resolved."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(reward_cfg, DictConfig):
        options: dict[str, Any] = OmegaConf.to_container(reward_cfg, resolve=True)  # type: ignore[assignment]
    else:
        options = dict(reward_cfg)
    return {str(k): v for k, v in options.items() if not str(k).startswith("_")}


# ----------------------------------------------------------------------------- the output contract


class RewardContractError(ConfigError):
    """A reward returned something other than the contract's scores (the reward's author's mistake)."""


def as_reward_dict(result: Any, n: int, source: str = "the reward") -> dict[str, torch.Tensor]:
    """Either form of a reward's output -> {"reward": (n,), <component>: (n,), ...} float32 CPU tensors.

    Raises RewardContractError, naming `source` and the contract, when "reward" is missing, an entry
    does not hold n numbers, or the output is not numbers at all (None, strings)."""
    parts = result if isinstance(result, Mapping) else {"reward": result}
    try:
        out = {
            str(k): torch.as_tensor(v, dtype=torch.float32).detach().cpu().reshape(-1)
            for k, v in parts.items()
        }
    except (TypeError, ValueError, RuntimeError):  # None, strings, ragged lists
        raise RewardContractError(
            f"{source} returned {_shape_of(result)} for {n} images; {_contract(n)}"
        ) from None
    if "reward" not in out or any(len(v) != n for v in out.values()):
        shapes = {k: tuple(v.shape) for k, v in out.items()}
        raise RewardContractError(f"{source} returned {shapes} for {n} images; {_contract(n)}")
    return out


def _contract(n: int) -> str:
    return (
        f"expected 'reward' of shape ({n},): a reward returns {n} numbers (a tensor, array or list), or a "
        f"dict with 'reward' and optional components, each of shape ({n},) (rlcm_exp/rewards/base.py)"
    )


def _shape_of(result: Any) -> str:
    """What a reward returned, in a few words (never its contents)."""
    if isinstance(result, Mapping):
        return "a dict with " + ", ".join(f"{k!r}: {_shape_of(v)}" for k, v in list(result.items())[:4])
    if hasattr(result, "shape"):
        return f"a {type(result).__name__} of shape {tuple(result.shape)}"
    if isinstance(result, list | tuple):
        kinds = sorted({type(v).__name__ for v in result})
        return f"a {type(result).__name__} of {len(result)} items ({', '.join(kinds[:3])})"
    return "None" if result is None else f"a {type(result).__name__}"


class CheckedReward:
    """A user's reward whose every output is checked against the contract, naming the reward (its
    `_target_`) in the error; its attributes are the reward's own."""

    def __init__(self, reward: Any, name: str) -> None:
        self.reward, self.name = reward, name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        return as_reward_dict(self.reward(images, prompts), len(prompts), source=self.name)

    def __getattr__(self, attr: str) -> Any:
        if attr in ("reward", "name"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(attr)
        return getattr(self.reward, attr)


def score_images(reward_fn: Any, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The reward of `images` as `as_reward_dict` gives it, computed the same way wherever it is called
    (training's worker thread, held-out evaluation inside the run's autocast, the evaluate command):
    with autocast off, so the reward runs in its own dtype (reward.dtype), never in the run's."""
    with contextlib.ExitStack() as stack:
        for device_type in {"cpu", images.device.type}:
            stack.enter_context(torch.autocast(device_type, enabled=False))
        return as_reward_dict(reward_fn(images, prompts), len(prompts))


def check_images(images: torch.Tensor, what: str) -> None:
    """The reward contract's input shape; a wrong one is a programming error, said plainly."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{what}: expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}"
        )


def check_prompts(images: torch.Tensor, prompts: Sequence[str]) -> None:
    """One prompt per image."""
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")


def score_in_chunks(
    score: Callable[[slice], torch.Tensor], n: int, batch_size: int, lock: threading.Lock
) -> torch.Tensor:
    """`score(slice)` over n images in chunks of `batch_size`, one chunk at a time under `lock` and
    without gradients (thread-safe, and one forward at a time bounds accelerator memory);
    returns (n,) float32 CPU."""
    out = []
    with lock, torch.no_grad():
        for i in range(0, n, batch_size):
            out.append(score(slice(i, i + batch_size)))
    return torch.cat(out).float().cpu() if out else torch.zeros(0)


# ----------------------------------------------------------------------------- image conversion


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] on any device -> (..., H, W, 3) uint8 numpy, channels last.

    The one float -> 8-bit conversion: clamp to [0, 1], scale by 255, round half to even, computed
    in float32 on the images' device (one small uint8 copy to the host). Every JPEG size, VLM
    input, transported and logged image goes through it, so they all see the same pixels.
    """
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images, via `to_uint8`."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """One (H, W, 3) uint8 image as a PNG (lossless) or JPEG file in memory."""
    buffer = io.BytesIO()
    if image_format == "png":
        # compress_level 1: the PNG stays lossless, and encoding is several times faster than the default 6
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image format {image_format!r}: use png or jpeg")
    return buffer.getvalue()

"""A weighted sum of several rewards, each component returned (and so logged) on its own.

    reward = sum_k weights[k] * component_k(images, prompts)

Returned in the dict form of the reward contract: {"reward": total, "<name>": component (unweighted),
...}; the trainer logs each as reward/<name>. A component that itself returns a dict contributes
its "reward" to the sum and its own components as "<name>/<sub>".

The YAML sets `_recursive_: false` so the components arrive here as configs and are built with the
`device` the trainer passes to this builder (Hydra would otherwise build them first, on the CPU).
Each is built by `rewards.base.build_reward`, the trainer's builder, so a component may be a
builder or a plain reward function `fn(images, prompts, **options)`; from Python, components may
also be ready callables.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import RewardFn, as_reward_dict, build_reward


def build_component(name: str, spec: Any, device: str | None) -> RewardFn:
    """A ready callable as is; a config built by `build_reward` (the trainer's builder, so a plain
    reward function works as a component too), with `device` if its builder takes one."""
    if callable(spec) and not isinstance(spec, DictConfig | Mapping):
        return spec
    if not isinstance(spec, DictConfig | Mapping) or "_target_" not in spec:
        raise ConfigError(
            f"reward.components.{name} must be a reward config with a _target_ (e.g. "
            "_target_: rlcm_exp.rewards.aesthetic.aesthetic) or a callable (images, prompts) -> rewards."
        )
    try:
        return build_reward(spec, device)
    except ConfigError as err:
        # the component's builder names its keys as reward.<key>; here they live one level down
        raise ConfigError(re.sub(r"\breward\.", f"reward.components.{name}.", str(err))) from err


class WeightedReward:
    """Calls each component in turn (they are thread-safe, so this is too) and sums with the weights."""

    def __init__(self, components: dict[str, RewardFn], weights: dict[str, float]) -> None:
        self.components = components
        self.weights = weights
        self.models: dict[str, str] = {}
        for name, fn in components.items():  # /health of a reward server shows the models of all parts
            for part, source in getattr(fn, "models", {}).items():
                self.models[f"{name}/{part}"] = source

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(images), dtype=torch.float32)
        for name, fn in self.components.items():
            value = fn(images, prompts)
            try:
                parts = as_reward_dict(value, len(images))
            except RuntimeError as err:
                raise RuntimeError(f"reward component {name}: {err}") from err
            for sub, tensor in parts.items():
                if sub != "reward":
                    out[f"{name}/{sub}"] = tensor
            out[name] = parts["reward"]
            total = total + self.weights[name] * parts["reward"]
        out["reward"] = total
        return out


def weighted(
    components: Mapping[str, Any],
    weights: Mapping[str, float],
    device: str | None = None,
) -> WeightedReward:
    """Weighted sum of named reward components; `weights` must name exactly the components."""
    if not components:
        raise ConfigError("reward.components is empty; give at least one named reward config.")
    if set(components) != set(weights):
        raise ConfigError(
            f"reward.weights names {sorted(weights)} but reward.components names {sorted(components)}; give "
            "exactly one weight per component."
        )
    if "reward" in components:
        raise ConfigError(
            "reward.components may not have a component named 'reward' (that key is the total)."
        )
    built = {str(name): build_component(str(name), spec, device) for name, spec in components.items()}
    return WeightedReward(built, {str(k): float(v) for k, v in weights.items()})

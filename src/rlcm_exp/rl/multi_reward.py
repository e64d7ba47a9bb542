"""Decoupled per-reward normalisation of advantages for several rewards (GDPO, "Group reward-Decoupled
Normalization Policy Optimization", NVlabs, arXiv 2601.05242).

With a weighted sum of rewards (reward=weighted), normalising the sum (what algo.advantage does
with rewards["reward"]) lets one reward's scale drown the others, and maps different mixes of
component outcomes to the same advantage ("advantage collapse": in a group of two, totals (1, 0) and
(2, 0) both give (+1, -1)). GDPO normalises each component on its own first:

    A_k   = advantage_fn(r_k)               each component k by the configured normalisation:
                                            per group (algo=grpo/rebel: (r - group mean) / (group std + eps))
                                            or per prompt (algo=rlcm/ddpo: a per-prompt tracker OF ITS OWN)
    A_sum = sum_k w_k A_k                   the reward's weights
    A     = (A_sum - mean(A_sum)) / (std(A_sum) + eps)      over the gathered round (batch_normalise)

A sample with any non-finite component gets advantage 0 and takes no part in any normalisation
(its weighted total is non-finite too, so the trainer's own count and policy apply unchanged).

The trainer picks the normalisation by config (reward_normalisation=sum | per_component, conf/
reward_normalisation/): `SumOfRewards` (algo.advantage of the total, the default) or `PerComponent`
(the above, with the weighted reward's own weights and one tracker per component, checkpointed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rlcm_exp.errors import ConfigError
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker

AdvantageFn = Callable[[np.ndarray, list[str], np.ndarray, Any], np.ndarray]


@dataclass
class MultiRewardAdvantages:
    """The combined advantage (N,) and each component's own normalised advantage (N,), float64;
    rows with a non-finite component are 0 everywhere (`finite` is False there)."""

    advantage: np.ndarray
    components: dict[str, np.ndarray]
    finite: np.ndarray


def component_trackers(template: PerPromptStatTracker, names: list[str]) -> dict[str, PerPromptStatTracker]:
    """One fresh per-prompt tracker per component, with the template's buffer size, min count and eps
    (per-prompt advantages keep each component's history apart). Checkpoint them all:
    {name: tracker.state_dict()}."""
    return {n: PerPromptStatTracker(template.buffer_size, template.min_count, template.eps) for n in names}


def _check(components: Mapping[str, np.ndarray], weights: Mapping[str, float], n: int) -> None:
    if not components or set(components) != set(weights):
        raise ValueError(
            f"decoupled advantages need one weight per component: components {sorted(components)}, "
            f"weights {sorted(weights)}"
        )
    shapes = {k: np.shape(v) for k, v in components.items()}
    if any(s != (n,) for s in shapes.values()):
        raise ValueError(f"every component needs ({n},) rewards (one per prompt), got {shapes}")


def decoupled_advantages(
    components: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    prompts: list[str],
    groups: np.ndarray,
    advantage_fn: AdvantageFn,
    trackers: Mapping[str, Any] | None = None,
    batch_normalise: bool = True,
    eps: float = 1e-6,
) -> MultiRewardAdvantages:
    """GDPO advantages of one gathered round (see the module docstring).

    components:   name -> (N,) unweighted rewards of that component (rewards["<name>"] of `weighted`)
    weights:      name -> its weight in the sum (WeightedReward.weights)
    prompts, groups: the round's N prompts and group ids (as the trainer passes them to algo.advantage)
    advantage_fn: the configured algo.advantage, `(rewards, prompts, groups, tracker) -> advantages`
    trackers:     name -> that component's tracker (`component_trackers`); None for stateless
                  advantages (group normalisation), which ignore the tracker
    batch_normalise: standardise the weighted sum over the round (GDPO's last step); False: A_sum
    """
    prompts = list(prompts)
    groups = np.asarray(groups)
    _check(components, weights, len(prompts))
    values = {k: np.asarray(v, dtype=np.float64) for k, v in components.items()}
    finite = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
    kept = [p for p, f in zip(prompts, finite, strict=True) if f]
    per_component = {k: np.zeros(len(prompts)) for k in values}
    total = np.zeros(len(prompts))
    if finite.any():
        for name, value in values.items():
            tracker = trackers[name] if trackers is not None else None
            per_component[name][finite] = advantage_fn(value[finite], kept, groups[finite], tracker)
            total[finite] += float(weights[name]) * per_component[name][finite]
        if batch_normalise:
            centred = total[finite] - total[finite].mean()
            total[finite] = centred / (total[finite].std() + eps)
    return MultiRewardAdvantages(total, per_component, finite)


def components_from(rewards: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, np.ndarray]:
    """The weighted components out of a reward's dict output ({"reward": total, "<name>": ...}) as
    float64 numpy; a missing one is a ValueError naming the keys there are."""
    missing = sorted(set(weights) - set(rewards))
    if missing:
        raise ValueError(
            f"decoupled advantages need the components {missing}, but the reward returned only "
            f"{sorted(rewards)}; use reward=weighted (each component is returned under its name)"
        )
    return {k: np.asarray(_numpy(rewards[k]), dtype=np.float64).reshape(-1) for k in weights}


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


# ---------------------------------------------------------------- the trainer's choice (reward_normalisation=)


@dataclass
class RoundRewards:
    """What a reward normalisation gets: the gathered round's finite rows, rewards by key (its `keys`),
    their prompts and group ids, and the configured algo.advantage with the algo's own tracker."""

    rewards: Mapping[str, np.ndarray]
    prompts: list[str]
    groups: np.ndarray
    advantage_fn: AdvantageFn
    tracker: Any


class SumOfRewards:
    """reward_normalisation=sum (the default): the configured algo.advantage of the reward's total
    rewards["reward"], as for a single reward. Stateless beyond the algo's own tracker."""

    keys: tuple[str, ...] = ("reward",)  # the reward outputs the round gathers for it

    def bind(self, reward_fn: Any, template: PerPromptStatTracker) -> SumOfRewards:
        return self

    def __call__(self, batch: RoundRewards) -> tuple[np.ndarray, dict[str, float]]:
        """Advantages of the round's finite rows (every array holds only those) and no extra metrics."""
        return np.asarray(
            batch.advantage_fn(batch.rewards["reward"], batch.prompts, batch.groups, batch.tracker)
        ), {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (a checkpoint of a per-component run has trackers this run does not use)."""


class PerComponent:
    """reward_normalisation=per_component (GDPO): each weighted component normalised on its own by
    algo.advantage (per-prompt advantages: one tracker per component, checkpointed), then summed with
    the weights and standardised over the round (`decoupled_advantages`). The weights are the reward's
    own (`reward_fn.weights`, as reward=weighted exposes them) unless given here."""

    def __init__(
        self, weights: Mapping[str, float] | None = None, batch_normalise: bool = True, eps: float = 1e-6
    ) -> None:
        self.weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        self.batch_normalise, self.eps = batch_normalise, eps
        self.trackers: dict[str, PerPromptStatTracker] = {}

    @property
    def keys(self) -> tuple[str, ...]:
        return ("reward", *sorted(self.weights or {}))

    def bind(self, reward_fn: Any, template: PerPromptStatTracker) -> PerComponent:
        """Take the reward's weights (unless configured) and make one tracker per component like `template`."""
        if self.weights is None:
            weights = getattr(reward_fn, "weights", None)
            if not isinstance(weights, Mapping) or not weights:
                raise ConfigError(
                    "reward_normalisation=per_component normalises each weighted component of the reward, "
                    "but this reward exposes no component weights: use a weighted reward (reward=weighted, "
                    "_target_: rlcm_exp.rewards.combine.weighted) or set reward_normalisation.weights"
                )
            self.weights = {str(k): float(v) for k, v in weights.items()}
        self.trackers = component_trackers(template, sorted(self.weights))
        return self

    def __call__(self, batch: RoundRewards) -> tuple[np.ndarray, dict[str, float]]:
        """GDPO advantages of the round's finite rows, and adv/<name>_mean, adv/<name>_std of each
        component's own normalised advantage (before weighting)."""
        if self.weights is None:
            raise RuntimeError("PerComponent.bind(reward_fn, tracker) must run before the first round")
        out = decoupled_advantages(
            components_from(batch.rewards, self.weights),
            self.weights,
            batch.prompts,
            batch.groups,
            batch.advantage_fn,
            self.trackers,
            self.batch_normalise,
            self.eps,
        )
        stats: dict[str, float] = {}
        for name, adv in out.components.items():
            stats[f"adv/{name}_mean"] = float(adv.mean()) if len(adv) else float("nan")
            stats[f"adv/{name}_std"] = float(adv.std()) if len(adv) else float("nan")
        return out.advantage, stats

    def state_dict(self) -> dict[str, Any]:
        return {name: t.state_dict() for name, t in self.trackers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Each component's tracker exactly as checkpointed; a checkpoint of other components is refused."""
        if set(state) != set(self.trackers):
            raise ConfigError(
                f"the checkpoint holds per-component trackers for {sorted(state)}, this run's reward has "
                f"components {sorted(self.trackers)}: resume with the reward the run was started with"
            )
        for name, tracker in self.trackers.items():
            tracker.load_state_dict(state[name])


class RewardNormalisation(Protocol):
    """What the round's advantages call (config group reward_normalisation): rewards of the round's
    finite rows by key (`keys`, gathered from every process) -> advantages and extra metrics."""

    @property
    def keys(self) -> tuple[str, ...]: ...

    def bind(self, reward_fn: Any, template: PerPromptStatTracker) -> RewardNormalisation: ...

    def __call__(self, batch: RoundRewards) -> tuple[np.ndarray, dict[str, float]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

"""GDPO-style decoupled advantages for several rewards, worked by hand: per group (algo=grpo's
advantage) and per prompt (algo=rlcm's tracker, one per component), weights, the final batch
standardisation, non-finite components, and the collapse of the summed reward that it avoids."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from rlcm_exp.rewards.combine import WeightedReward
from rlcm_exp.rl.group import group_advantages
from rlcm_exp.rl.multi_reward import component_trackers, components_from, decoupled_advantages
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker, per_prompt_advantages

EPS = 1e-9
GROUP = functools.partial(group_advantages, scale_by_std=True, eps=EPS)
PROMPTS4 = ["p", "p", "q", "q"]
GROUPS4 = np.array([0, 0, 1, 1])


def test_per_group_gdpo_keeps_apart_what_the_summed_reward_collapses():
    # group 0: a = (1, 0), b = (0, 0) -> totals (1, 0); group 1: a = (1, 0), b = (1, 0) -> totals (2, 0)
    a, b = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0])
    summed = GROUP(a + b, PROMPTS4, GROUPS4, None)
    np.testing.assert_allclose(summed, [1, -1, 1, -1], atol=1e-6)  # GRPO on the sum: both groups alike
    out = decoupled_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, PROMPTS4, GROUPS4, GROUP, eps=EPS)
    np.testing.assert_allclose(out.components["a"], [1, -1, 1, -1], atol=1e-6)
    np.testing.assert_allclose(out.components["b"], [0, 0, 1, -1], atol=1e-6)  # group 0: std 0 -> 0
    # A_sum = (1, -1, 2, -2): mean 0, std sqrt((1 + 1 + 4 + 4) / 4) = sqrt(2.5)
    np.testing.assert_allclose(out.advantage, np.array([1, -1, 2, -2]) / math.sqrt(2.5), atol=1e-6)
    assert out.finite.all()


def test_weights_scale_each_normalised_component_and_batch_normalise_is_optional():
    a, b = np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.0, 0.0, 10.0, 0.0])  # b's scale no longer matters
    weights = {"a": 1.0, "b": 0.5}
    raw = decoupled_advantages({"a": a, "b": b}, weights, PROMPTS4, GROUPS4, GROUP, batch_normalise=False)
    np.testing.assert_allclose(raw.advantage, [1, -1, 1.5, -1.5], atol=1e-6)  # 1 * A_a + 0.5 * A_b
    out = decoupled_advantages({"a": a, "b": b}, weights, PROMPTS4, GROUPS4, GROUP, eps=EPS)
    std = math.sqrt((1 + 1 + 2.25 + 2.25) / 4)
    np.testing.assert_allclose(out.advantage, np.array([1, -1, 1.5, -1.5]) / std, atol=1e-6)


def test_per_prompt_gdpo_gives_each_component_its_own_tracker():
    template = PerPromptStatTracker(buffer_size=16, min_count=1, eps=EPS)
    trackers = component_trackers(template, ["a", "b"])
    a, b = np.array([3.0, 1.0, 10.0, 10.0]), np.array([0.0, 2.0, 5.0, 7.0])
    out = decoupled_advantages(
        {"a": a, "b": b}, {"a": 1.0, "b": 1.0}, PROMPTS4, GROUPS4, per_prompt_advantages, trackers, eps=EPS
    )
    # a: p holds (3, 1): mean 2, std 1 -> (1, -1); q holds (10, 10): std 0 -> (0, 0)
    np.testing.assert_allclose(out.components["a"], [1, -1, 0, 0], atol=1e-6)
    # b: p holds (0, 2) -> (-1, 1); q holds (5, 7) -> (-1, 1)
    np.testing.assert_allclose(out.components["b"], [-1, 1, -1, 1], atol=1e-6)
    # A_sum = (0, 0, -1, 1): mean 0, std sqrt(0.5)
    np.testing.assert_allclose(out.advantage, np.array([0, 0, -1, 1]) / math.sqrt(0.5), atol=1e-6)
    assert list(trackers["a"].buffers["p"]) == [3.0, 1.0] and list(trackers["b"].buffers["p"]) == [0.0, 2.0]
    assert trackers["a"].buffer_size == 16 and trackers["a"] is not trackers["b"]


def test_a_non_finite_component_zeroes_its_sample_and_stays_out_of_every_statistic():
    a, b = np.array([1.0, 0.0, 4.0, 2.0]), np.array([0.0, math.nan, 1.0, 3.0])
    out = decoupled_advantages({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, PROMPTS4, GROUPS4, GROUP, eps=EPS)
    assert out.finite.tolist() == [True, False, True, True]
    # group 0 keeps one sample: advantage 0; group 1: A_a = (1, -1), A_b = (-1, 1) -> A_sum = (0, 0)
    np.testing.assert_allclose(out.advantage, [0, 0, 0, 0], atol=1e-6)
    assert out.components["b"][1] == 0.0
    nothing = decoupled_advantages({"a": np.full(2, math.nan)}, {"a": 1.0}, ["p", "p"], np.zeros(2), GROUP)
    assert nothing.advantage.tolist() == [0.0, 0.0] and not nothing.finite.any()


def test_mismatched_names_or_shapes_and_components_from_a_weighted_reward():
    with pytest.raises(ValueError, match=r"one weight per component: components \['a'\], weights \['b'\]"):
        decoupled_advantages({"a": np.zeros(2)}, {"b": 1.0}, ["p", "p"], np.zeros(2), GROUP)
    with pytest.raises(ValueError, match=r"needs \(2,\) rewards"):
        decoupled_advantages({"a": np.zeros(3)}, {"a": 1.0}, ["p", "p"], np.zeros(2), GROUP)
    reward = WeightedReward(
        {"red": lambda x, p: x[:, 0].mean((1, 2)), "green": lambda x, p: x[:, 1].mean((1, 2))},
        {"red": 1.0, "green": 2.0},
    )
    x = torch.rand(4, 3, 2, 2)
    out = reward(x, PROMPTS4)
    comps = components_from(out, reward.weights)
    assert set(comps) == {"red", "green"} and comps["red"].dtype == np.float64
    np.testing.assert_allclose(comps["green"], x[:, 1].mean((1, 2)).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"components \['blue'\].*returned only \['reward'\]"):
        components_from({"reward": torch.zeros(4)}, {"blue": 1.0})

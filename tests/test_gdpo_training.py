"""reward_normalisation=per_component (GDPO) in the trainer: hand-worked advantages through the round's
advantages (RoundAdvantages), the reward's weights taken from a weighted reward, per-component trackers
checkpointed and restored exactly, and a toy run rewarded by the detector and JPEG size logging both
components' rewards and advantages."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.lora import LoraSettings
from rlcm_exp.rewards.combine import WeightedReward
from rlcm_exp.rl.group import group_advantages
from rlcm_exp.rl.multi_reward import PerComponent, SumOfRewards
from rlcm_exp.rl.ppo import PPOSettings
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker, per_prompt_advantages
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.rounds import RoundAdvantages
from rlcm_exp.training.settings import AlgoSettings, linear_lr

from .helpers import TOY_SMALL, run_in_process, without_timings

EPS = 1e-9
TRACKER = PerPromptStatTracker(buffer_size=16, min_count=2, eps=EPS)


def algo(advantage, group_size: int) -> AlgoSettings:  # noqa: ANN001
    return AlgoSettings(
        name="test",
        lr_schedule=linear_lr,
        ppo=PPOSettings(adv_clip_max=5.0),
        lora=LoraSettings(rank=4, alpha=4, init="gaussian"),
        stat_tracker=PerPromptStatTracker(buffer_size=16, min_count=2, eps=EPS),
        group_size=group_size,
        advantage=advantage,
    )


def weighted_reward(weights: dict[str, float]) -> WeightedReward:
    return WeightedReward({k: (lambda images, prompts: torch.zeros(len(prompts))) for k in weights}, weights)


def round_advantages(advantage, group_size: int, normalisation) -> RoundAdvantages:  # noqa: ANN001
    settings = algo(advantage, group_size)
    bound = normalisation.bind(weighted_reward({"a": 1.0, "b": 2.0}), settings.stat_tracker)
    return RoundAdvantages(settings, Accelerator(cpu=True), 64, Path("metrics.jsonl"), bound)


def test_per_group_advantages_by_hand_through_the_round() -> None:
    """Groups of 2: a = (3, 1 | 5, 5), b = (0, 1 | 1, 0), weights a 1, b 2 (the reward's own).
    Per component: A_a = (1, -1 | 0, 0) (group 1 constant), A_b = (-1, 1 | 1, -1); weighted sum
    (-1, 1, 2, -2), mean 0, std sqrt(2.5). The summed reward (3, 3 | 7, 5) would give (0, 0 | 1, -1):
    b's signal in group 0 drowned by a's scale."""
    group = functools.partial(group_advantages, eps=EPS)
    a, b = torch.tensor([3.0, 1.0, 5.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    rewards = {"reward": a + 2 * b, "a": a, "b": b, "b/part": b}
    adv, stats = round_advantages(group, 2, PerComponent(eps=EPS))(["p", "p", "q", "q"], rewards)
    expected = torch.tensor([-1.0, 1.0, 2.0, -2.0]) / math.sqrt(2.5)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert stats["adv/a_mean"] == pytest.approx(0.0, abs=1e-9)
    assert stats["adv/a_std"] == pytest.approx(math.sqrt(0.5), abs=1e-6)  # std of (1, -1, 0, 0)
    assert stats["adv/b_std"] == pytest.approx(1.0, abs=1e-6)
    assert stats["reward_mean"] == pytest.approx(4.5)  # totals (3, 3, 7, 5): the logged reward is the sum
    summed, summed_stats = round_advantages(group, 2, SumOfRewards())(["p", "p", "q", "q"], rewards)
    torch.testing.assert_close(summed, torch.tensor([0.0, 0.0, 1.0, -1.0]), atol=1e-6, rtol=0)
    assert not any(k.startswith("adv/") for k in summed_stats)


def test_non_finite_component_gets_zero_advantage_and_is_counted() -> None:
    group = functools.partial(group_advantages, eps=EPS)
    a, b = torch.tensor([3.0, 1.0, 5.0, float("nan")]), torch.tensor([0.0, 1.0, 1.0, 0.0])
    adv, stats = round_advantages(group, 2, PerComponent(eps=EPS))(
        ["p", "p", "q", "q"], {"reward": a + 2 * b, "a": a, "b": b}
    )
    assert adv[3] == 0 and stats["reward_nonfinite"] == 1.0
    # finite rows: group 0 as above (-1, 1); q alone in group 1 -> 0; sum (-1, 1, 0) -> / sqrt(2/3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 1.0, 0.0]) / math.sqrt(2 / 3), atol=1e-6, rtol=0)


def test_per_prompt_trackers_restore_exactly_from_their_state() -> None:
    rng = np.random.default_rng(0)
    prompts = ["p", "q", "p", "q"]
    rounds = [
        {k: torch.tensor(rng.normal(size=4) * s) for k, s in (("a", 1.0), ("b", 100.0))} for _ in range(3)
    ]
    for r in rounds:
        r["reward"] = r["a"] + 2 * r["b"]
    running = round_advantages(per_prompt_advantages, 1, PerComponent())
    running(prompts, rounds[0])
    state = json.loads(json.dumps(running.normalisation.state_dict()))  # as state.json holds it
    assert sorted(state) == ["a", "b"] and state["a"] == {
        "p": rounds[0]["a"][[0, 2]].tolist(),
        "q": rounds[0]["a"][[1, 3]].tolist(),
    }
    restored = round_advantages(per_prompt_advantages, 1, PerComponent())
    restored.normalisation.load_state_dict(state)
    fresh = round_advantages(per_prompt_advantages, 1, PerComponent())
    expected = [running(prompts, r)[0] for r in rounds[1:]]
    for r, want in zip(rounds[1:], expected, strict=True):
        torch.testing.assert_close(restored(prompts, r)[0], want, atol=0, rtol=0)
    assert not torch.allclose(fresh(prompts, rounds[1])[0], expected[0])  # the history matters
    with pytest.raises(ConfigError, match="per-component trackers for"):
        restored.normalisation.load_state_dict({"a": {}})


def test_per_component_needs_a_reward_with_weights() -> None:
    with pytest.raises(ConfigError, match="reward=weighted"):
        PerComponent().bind(lambda images, prompts: torch.zeros(len(prompts)), TRACKER)
    bound = PerComponent(weights={"x": 1.0}).bind(lambda images, prompts: torch.zeros(len(prompts)), TRACKER)
    assert bound.keys == ("reward", "x") and set(bound.trackers) == {"x"}


TOY = [
    *TOY_SMALL,
    "reward=toy_jpeg_detector",
    "reward_normalisation=per_component",
    "task.prompts.prompts=[a red circle on a green background]",  # one prompt: its trackers fill up
    "algo.stat_tracker.min_count=2",  # per-prompt statistics (history) from the second round on
    "train.epochs=2",
    "train.eval_every=0",
    "train.checkpoint_every=1",
]


def test_toy_run_logs_both_components_and_resumes_their_trackers_exactly(tmp_path) -> None:  # noqa: ANN001
    records = run_in_process(TOY, tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1]
    for rec in records:
        for name in ("detector", "jpeg"):
            assert math.isfinite(rec[f"reward/{name}"]) and math.isfinite(rec[f"adv/{name}_mean"])
            assert rec[f"adv/{name}_std"] > 0.5  # each normalised on its own: about 1 unless constant
        assert rec["reward/jpeg"] < 0 <= rec["reward/detector"] <= 1
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records
    state = json.loads((tmp_path / "run" / "checkpoints" / "epoch_000001" / "state.json").read_text())
    trackers = state["reward_normalisation"]
    assert sorted(trackers) == ["detector", "jpeg"]
    assert [len(v) for v in trackers["jpeg"].values()] == [8]  # the first round's 8 rewards of the prompt
    # resume from epoch 1's checkpoint in a copy: epoch 1 is recomputed identically (its advantages
    # use the restored trackers' first-round history)
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "checkpoints" / "epoch_000002")
    resumed = run_in_process([*TOY, "resume=auto"], tmp_path / "copy")
    assert [r["epoch"] for r in resumed] == [1]
    assert without_timings(resumed) == without_timings(records[1:])

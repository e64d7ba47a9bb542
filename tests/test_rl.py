"""Pure tensor code against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rl.gaussian import gaussian_log_prob
from rlcm_exp.rl.ppo import clip_advantages, ppo_loss
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker
from rlcm_exp.training.batching import plan_batches
from rlcm_exp.training.update import trained_steps


def test_gaussian_log_prob_is_the_element_mean_of_the_closed_form() -> None:
    x = torch.tensor([[[[1.0, 2.0]]], [[[0.0, -1.0]]]])
    mean = torch.zeros_like(x)
    std = torch.tensor(2.0)
    # log N(1; 0, 4) = -1/8 - log 2 - 0.5 log(2 pi); log N(2; 0, 4) = -4/8 - log 2 - 0.5 log(2 pi)
    c = -math.log(2.0) - 0.5 * math.log(2 * math.pi)
    expected = torch.tensor([(-1 / 8 - 4 / 8) / 2 + c, (0 - 1 / 8) / 2 + c])
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    ref = torch.distributions.Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), ref)


def test_stat_tracker_uses_batch_stats_below_min_count_then_per_prompt() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    # round 1: each prompt has 2 < 3 values -> batch mean 2.5, batch std sqrt(1.25)
    adv = tracker.update(["a", "a", "b", "b"], np.array([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(1.25) + 1e-6
    np.testing.assert_allclose(adv, [(1 - 2.5) / std, (2 - 2.5) / std, (3 - 2.5) / std, (4 - 2.5) / std])
    # round 2: "a" gets 2 more -> buffer [1,2,3,5]: mean 2.75, std sqrt(2.1875); "b" 1 more -> [3,4,6]
    adv = tracker.update(["a", "a", "b"], np.array([3.0, 5.0, 6.0]))
    sa = math.sqrt(2.1875) + 1e-6
    sb = np.std([3.0, 4.0, 6.0]) + 1e-6
    np.testing.assert_allclose(adv, [(3 - 2.75) / sa, (5 - 2.75) / sa, (6 - 13 / 3) / sb])
    # buffer is a deque of size 4: "a" drops its oldest value
    tracker.update(["a"], np.array([7.0]))
    assert list(tracker.buffers["a"]) == [2.0, 3.0, 5.0, 7.0]
    state = tracker.state_dict()
    fresh = PerPromptStatTracker(buffer_size=4, min_count=3)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


def test_ppo_loss_clips_at_one_plus_minus_eps() -> None:
    eps = 0.1
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, info = ppo_loss(new, old, adv, eps)
    # per sample max(-A r, -A clip(r)): r=1 -> -1; r=1.5,A=1 -> max(-1.5,-1.1)=-1.1;
    # r=0.5,A=-1 -> max(0.5, 0.9)=0.9; r=1.05,A=-2 -> max(2.1, 2.1)=2.1
    assert loss.item() == pytest.approx((-1 - 1.1 + 0.9 + 2.1) / 4)
    assert info["clipfrac"].item() == pytest.approx(0.5)  # 1.5 and 0.5 are outside 1 +- 0.1
    assert info["ratio_mean"].item() == pytest.approx((1 + 1.5 + 0.5 + 1.05) / 4)
    assert info["approx_kl"].item() == pytest.approx(0.5 * float((new**2).mean()))
    # gradient flows only through unclipped terms: d/dnew of -A r at r=1 is -A
    new_req = new.clone().requires_grad_(True)
    ppo_loss(new_req, old, adv, eps)[0].backward()
    assert new_req.grad is not None
    torch.testing.assert_close(new_req.grad, torch.tensor([-1.0, 0.0, 0.0, 2.0 * 1.05]) / 4)


def test_clip_advantages() -> None:
    torch.testing.assert_close(
        clip_advantages(torch.tensor([-20.0, 3.0, 12.0]), 10.0), torch.tensor([-10.0, 3.0, 10.0])
    )


def _plan(**kw):
    args = dict(
        world_size=1,
        samples_per_epoch=32,
        sample_batch_size=8,
        train_batch_size=4,
        samples_per_step=16,
        inner_epochs=1,
        transitions_per_trajectory=7,
        timestep_fraction=1.0,
    )
    args.update(kw)
    return plan_batches(**args)


def test_batch_plan_derives_per_process_sizes() -> None:
    p = _plan(world_size=2)
    assert (
        p.samples_per_process,
        p.sampling_batches,
        p.grad_accum_minibatches,
        p.optimizer_steps_per_epoch,
    ) == (
        16,
        2,
        2,
        2,
    )
    assert _plan(timestep_fraction=0.5).trained_transitions == 3
    assert _plan().eligible_transitions == 7  # the default window: any transition
    # 7 x 0.3 = 2.1 -> the first 3 transitions are eligible; 7 x 0.3 trains 2 of them
    window = _plan(timestep_fraction=0.3, timestep_window=0.3)
    assert (window.trained_transitions, window.eligible_transitions) == (2, 3)
    assert _plan(timestep_fraction=0.5, timestep_window=0.5).eligible_transitions == 4


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"world_size": 3}, "train.samples_per_epoch"),
        ({"sample_batch_size": 5}, "train.sample_batch_size"),
        ({"train_batch_size": 3}, "train.train_batch_size"),
        ({"samples_per_step": 12}, "train.samples_per_step"),
        ({"samples_per_step": 64, "train_batch_size": 8}, "train.samples_per_step"),
        ({"timestep_fraction": 0.0}, "algo.timestep_fraction"),
        ({"timestep_fraction": 0.1}, "algo.timestep_fraction"),
        ({"timestep_window": 0.0}, "algo.timestep_window"),
        ({"timestep_window": 1.5}, "algo.timestep_window"),
        ({"timestep_fraction": 0.5, "timestep_window": 0.2}, "algo.timestep_window"),
    ],
)
def test_batch_plan_errors_name_the_keys(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _plan(**kw)


def test_trained_steps_are_distinct_and_inside_the_window() -> None:
    g = torch.Generator().manual_seed(0)
    steps = trained_steps(256, 5, 3, g)
    assert steps.shape == (256, 3)
    assert int(steps.max()) == 4 and int(steps.min()) == 0  # the window's ends are reachable...
    assert all(len(set(row.tolist())) == 3 for row in steps)  # ...without repeats in a trajectory
    # the default window (all transitions) draws what the trainer always drew: same generator, same steps
    a = trained_steps(8, 10, 10, torch.Generator().manual_seed(1))
    b = torch.argsort(torch.rand(8, 10, generator=torch.Generator().manual_seed(1)), dim=1)
    assert torch.equal(a, b)

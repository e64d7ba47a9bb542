"""Beyond the paper on the same runner (issue 21): group advantages (GRPO), REBEL, the KL to the base
model, EMA weights and the diversity monitor, against hand-worked values; then each algorithm on the
tiny model: the first-minibatch ratio stays 1, kl_to_base starts at 0, the monitors are logged."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.diversity import pixel_features, within_prompt_diversity
from rlcm_exp.models.lora import resolve_lora_folder
from rlcm_exp.rl.gaussian import gaussian_log_prob
from rlcm_exp.rl.group import group_advantages, group_normalise
from rlcm_exp.rl.kl import gaussian_kl_same_std
from rlcm_exp.rl.objective import LossInputs
from rlcm_exp.rl.rebel import RebelLoss, rebel_loss_value
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.batching import check_groups
from rlcm_exp.training.ema import EMA
from rlcm_exp.training.update import group_order

from .helpers import SMALL, run_in_process


def test_group_advantages_normalise_within_each_group() -> None:
    rewards = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 7.0])
    groups = np.array([0, 0, 1, 1, 1, 2])
    # group 0: mean 2, std 1; group 1: mean 3, std sqrt((1 + 1 + 4) / 3) = sqrt 2; group 2: alone -> 0
    eps = 1e-6
    expected = [
        -1 / (1 + eps),
        1 / (1 + eps),
        -1 / (2**0.5 + eps),
        -1 / (2**0.5 + eps),
        2 / (2**0.5 + eps),
        0.0,
    ]
    np.testing.assert_allclose(group_normalise(rewards, groups), expected, rtol=1e-12)
    np.testing.assert_allclose(group_normalise(rewards, groups, scale_by_std=False), [-1, 1, -1, -1, 2, 0])
    # the loop's signature: prompts and the per-prompt tracker are not read
    out = group_advantages(rewards, list("aabbbc"), groups, tracker=None, scale_by_std=False)
    np.testing.assert_allclose(out, [-1, 1, -1, -1, 2, 0])


def test_group_order_keeps_groups_together_and_is_randperm_for_groups_of_one() -> None:
    order = group_order(12, 1, torch.Generator().manual_seed(3))
    assert torch.equal(order, torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    order = group_order(12, 2, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(12))
    assert torch.all(order[0::2] % 2 == 0) and torch.equal(order[1::2], order[0::2] + 1)


def _rebel_batch(
    per_call_rows: torch.Tensor, adv: torch.Tensor, totals: torch.Tensor, trained: int
) -> LossInputs:
    new = per_call_rows.reshape(-1).clone().requires_grad_(True)
    return LossInputs(new, torch.zeros_like(new), adv.repeat(per_call_rows.shape[0]), 0.0, 4, trained, totals)


def test_rebel_loss_hand_worked_value_and_gradient_over_calls() -> None:
    # log-ratios (new - old), transitions x rows; rows (0, 1) and (2, 3) are the pairs
    log_ratio = torch.tensor([[0.1, -0.2, 0.0, 0.3], [0.2, 0.1, -0.1, 0.0]])
    adv = torch.tensor([1.0, -1.0, 0.5, 0.5])
    eta = 0.5
    totals = log_ratio.sum(0)  # [0.3, -0.1, -0.1, 0.3]
    # pair 0: D = 0.4, D / eta = 0.8, dA = 2 -> residual -1.2; pair 1: D = -0.4 -> -0.8, dA = 0 -> -0.8
    loss, residual = rebel_loss_value(totals, adv, eta)
    assert loss.item() == pytest.approx((1.44 + 0.64) / 2)  # a mean over pairs, not a sum
    torch.testing.assert_close(residual, torch.tensor([-1.2, -0.8]))
    # d loss / d log_ratio[t, row] = 2 residual / eta / pairs * (+1 for the pair's first row, -1 second)
    expected_grad = torch.tensor([-2.4, 2.4, -1.6, 1.6]).repeat(2)
    # one call over both transitions, and two calls of one: the loop's scaling per_call / trained
    for per_call in (2, 1):
        grads = []
        for j in range(0, 2, per_call):
            batch = _rebel_batch(log_ratio[j : j + per_call], adv, totals, trained=2)
            scaled, info = RebelLoss(eta)(batch)
            assert info["loss"].item() == pytest.approx(1.04)
            (scaled * per_call / 2).backward()
            assert batch.new_log_prob.grad is not None
            grads.append(batch.new_log_prob.grad)
        torch.testing.assert_close(torch.cat(grads), expected_grad)


def test_rebel_averages_over_pairs() -> None:
    totals, adv = torch.tensor([0.3, -0.1, -0.1, 0.3]), torch.tensor([1.0, -1.0, 0.5, 0.5])
    doubled = rebel_loss_value(totals.repeat(2), adv.repeat(2), 0.5)[0]
    assert doubled.item() == pytest.approx(rebel_loss_value(totals, adv, 0.5)[0].item())


def test_kl_closed_form_matches_a_monte_carlo_estimate() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 1, 2, 2, generator=g)
    base = mean + 0.3 * torch.randn(2, 1, 2, 2, generator=g)
    std = torch.tensor([0.5, 0.9]).view(2, 1, 1, 1)
    closed = gaussian_kl_same_std(mean, base, std)
    # per element (mu - mu_b)^2 / (2 sigma^2), averaged over the 4 elements
    torch.testing.assert_close(closed, ((mean - base) ** 2 / (2 * std**2)).mean(dim=(1, 2, 3)))
    n = 200_000  # E_{x ~ pi_theta}[log pi_theta(x) - log pi_base(x)], element-averaged like the log-probs
    x = mean + std * torch.randn(n, 2, 1, 2, 2, generator=g)
    estimate = gaussian_log_prob(
        x.flatten(0, 1), mean.repeat(n, 1, 1, 1), std.repeat(n, 1, 1, 1)
    ) - gaussian_log_prob(x.flatten(0, 1), base.repeat(n, 1, 1, 1), std.repeat(n, 1, 1, 1))
    mc = estimate.view(n, 2).mean(0)
    torch.testing.assert_close(mc, closed, atol=3e-3, rtol=0.02)  # fmt: skip


def test_ema_update_swap_and_state() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0]))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(2.0)
    ema.update()  # 0.9 * 1 + 0.1 * 2
    with torch.no_grad():
        p.fill_(3.0)
    ema.update()  # 0.9 * 1.1 + 0.1 * 3
    assert ema.shadow[0].item() == pytest.approx(1.29)
    with ema.swapped():
        assert p.item() == pytest.approx(1.29)
    assert p.item() == 3.0
    fresh = EMA([p], decay=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert torch.equal(fresh.shadow[0], ema.shadow[0])


def test_within_prompt_diversity_hand_worked() -> None:
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    prompts = ["a", "a", "b", "c", "c", "c"]
    # a: one pair at distance 5; b: alone, skipped; c: distances 1, 1, sqrt 2
    expected = (5.0 + (2 + math.sqrt(2)) / 3) / 2
    assert within_prompt_diversity(feats, prompts) == pytest.approx(expected)
    assert math.isnan(within_prompt_diversity(feats[:1], ["a"]))
    images = torch.full((2, 3, 64, 64), 0.25)
    assert pixel_features(images).shape == (2, 192) and torch.all(pixel_features(images) == 0.25)


def test_group_batch_arithmetic_names_the_keys() -> None:
    check_groups(4, 8, 2, pairs=False)  # GRPO: a group may straddle training minibatches
    with pytest.raises(ConfigError, match=r"algo.group_size=3 .*train.sample_batch_size=8"):
        check_groups(3, 8, 4, pairs=False)
    with pytest.raises(ConfigError, match=r"algo.group_size=4 .*train.train_batch_size=2"):
        check_groups(4, 8, 2, pairs=True)
    with pytest.raises(ConfigError, match=r"algo.group_size=1 must be even"):
        check_groups(1, 8, 4, pairs=True)


ALGOS = {
    "rlcm": ["algo=rlcm"],
    "ddpo": ["algo=ddpo", "sampler.num_steps=3"],
    "grpo": ["algo=grpo"],
    "grpo_ddim": ["algo=grpo", "sampler=ddim", "sampler.num_steps=3"],
    "rebel": ["algo=rebel"],
    "rlcm_kl_ema": ["algo=rlcm", "algo.kl_coef=10", "train.ema_decay=0.5"],
}


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_every_algorithm_keeps_the_first_ratio_at_one(tiny_cache, tmp_path, algo) -> None:
    extra = [
        "train.epochs=2",
        "train.samples_per_epoch=8",  # one optimizer step per epoch: the first ratio is the first step's
        "reward@gold_reward=jpeg_incompressibility",
        "task.eval_prompts.prompts=[a cat]",
        "train.eval_seeds=1",
    ]
    records = run_in_process([*SMALL, *ALGOS[algo], *extra], tmp_path)
    assert len(records) == 2
    for rec in records:
        assert rec["ratio_first_max_dev"] <= 1e-5 and abs(rec["ratio_first"] - 1) <= 1e-5
        assert math.isfinite(rec["kl_to_base"]) and math.isfinite(rec["loss"])
    assert records[0]["kl_to_base"] == 0.0  # LoRA B starts at zero: the first round's policy is the base
    evals = read_metrics(tmp_path / "eval.jsonl")
    assert all(math.isfinite(e["eval_gold_reward_mean"]) for e in evals)
    if "ema" in algo:  # what sample / evaluate / export read with ema=true
        assert resolve_lora_folder(tmp_path, ema=True) == tmp_path / "checkpoints" / "final_ema"
    else:
        with pytest.raises(ConfigError, match="ema=true"):
            resolve_lora_folder(tmp_path, ema=True)


def test_grpo_rounds_hold_whole_groups_with_their_own_noise(tmp_path) -> None:
    from rlcm_exp.configs import compose
    from rlcm_exp.training.build import build_trainer, make_accelerator

    cfg = compose(overrides=[*SMALL, "algo=grpo", "algo.group_size=4", "train.reward_workers=0"])
    trainer = build_trainer(cfg, tmp_path, make_accelerator(cfg))
    traj, rewards, _ = trainer.sample_round(0)
    trainer.close()
    prompts = traj.prompts
    assert len(prompts) == 16
    for g in range(0, 16, 4):  # four consecutive copies of one prompt, each its own initial noise
        assert len(set(prompts[g : g + 4])) == 1
        noise = traj.latents[g : g + 4, 0].flatten(1)
        assert torch.cdist(noise, noise).fill_diagonal_(1.0).min() > 0
    advantages, _ = trainer.advantages(prompts, rewards["reward"])
    expected = group_normalise(rewards["reward"].double().numpy(), np.arange(16) // 4)
    np.testing.assert_allclose(advantages.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_run_summary_draws_the_over_optimisation_monitors(tmp_path) -> None:  # noqa: ANN001
    """reward_vs_time.png gains a panel with diversity, kl_to_base and the gold reward when logged."""
    from rlcm_exp.analysis.figures import reward_vs_time_figure

    records = [
        {
            "wallclock_s": float(e),
            "reward_mean": 0.1 * e,
            "reward_std": 0.1,
            "diversity": 2.0 - 0.1 * e,
            "kl_to_base": 1e-3 * e,
        }
        for e in range(5)
    ]
    evals = [{"wallclock_s": 0.0, "eval_reward_mean": 0.0, "eval_gold_reward_mean": 0.5}]
    plain = reward_vs_time_figure(
        [{k: r[k] for k in ("wallclock_s", "reward_mean", "reward_std")} for r in records],
        [],
        tmp_path / "a.png",
    )
    both = reward_vs_time_figure(records, evals, tmp_path / "b.png")
    from PIL import Image

    assert Image.open(both).size[1] > Image.open(plain).size[1]  # the monitor panel below

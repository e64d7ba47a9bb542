"""The evaluate CLI (held-out reward, rollout timing, time budgets) and the compare CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlcm_exp.evaluation.budget import budgeted_sample
from rlcm_exp.evaluation.runs import merge_run_config
from rlcm_exp.evaluation.suite import run_evaluation
from rlcm_exp.policies.ddim import build_ddim_policy
from rlcm_exp.policies.lcm import build_lcm_policy
from rlcm_exp.tracking import read_metrics

from .helpers import SMALL, compose_eval, run_entry, run_in_process

PROMPTS = ["a red cat", "a blue dog"]


def gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_budgeted_sample_without_budget_is_sample(tiny_family, kind) -> None:
    """Re-driving the policy step by step draws the same numbers: no budget gives `sample`'s images."""
    if kind == "lcm":
        policy = build_lcm_policy(tiny_family, num_steps=4)
    else:
        policy = build_ddim_policy(tiny_family, num_steps=5)
    expected = policy.sample(PROMPTS, gens([3, 4])).images
    full = budgeted_sample(policy, PROMPTS, gens([3, 4]))
    assert full.steps_taken == policy.num_steps
    torch.testing.assert_close(full.images, expected, rtol=0, atol=1e-6)
    # a cap on steps stops early and decodes the current estimate, which differs from the final image
    early = budgeted_sample(policy, PROMPTS, gens([3, 4]), max_steps=2)
    assert early.steps_taken == 2 and early.images.shape == expected.shape
    assert (early.images - expected).abs().max() > 0
    # a spent budget still takes the first step (there is no estimate before it)
    assert budgeted_sample(policy, PROMPTS, gens([3, 4]), max_seconds=0.0).steps_taken == 1
    assert budgeted_sample(policy, PROMPTS, gens([3, 4]), max_seconds=1e9).steps_taken == policy.num_steps


@pytest.mark.subprocess
def test_evaluate_cli_reads_the_run_and_matches_its_heldout_eval(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_in_process([*SMALL, "train.epochs=1", "optimizer.lr=0.05", "train.eval_every=1"], run_dir)
    trained = read_metrics(run_dir / "eval.jsonl")[-1]  # after the last epoch, seeds 0..3

    # only the checkpoint is given: model, sampler, task and reward come from the run's config.yaml
    overrides = [
        f"checkpoint={run_dir}",
        f"out={tmp_path / 'ev'}",
        "steps=[2,4]",
        "budget_points=2",
        "budget_trajectories=16",
    ]
    result = run_evaluation(compose_eval(overrides), overrides)
    assert result["task"] == "compression" and result["algo"] == "rlcm" and result["num_steps"] == 4
    assert result["heldout"]["eval_reward_mean"] == pytest.approx(trained["eval_reward_mean"], rel=1e-4)
    assert [r["num_steps"] for r in result["steps"]] == [2, 4]
    assert all(r["seconds_per_image"] > 0 and r["n"] == 16 for r in result["steps"])
    assert len(result["budgets"]) == 2 and result["budgets"][0]["budget_s"] < result["budgets"][1]["budget_s"]
    assert 1 <= result["budgets"][0]["steps_mean"] <= result["budgets"][1]["steps_mean"] <= 4
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["heldout"] == result["heldout"]

    # command-line overrides win over the run's config; the base model differs from the trained one
    overrides = ["model=tiny", "task=compression", "sampler.num_steps=2", f"out={tmp_path / 'base'}"]
    base = run_evaluation(compose_eval(overrides), overrides)
    assert base["num_steps"] == 2 and base["checkpoint"] is None
    overrides = [
        f"checkpoint={run_dir / 'checkpoints' / 'final'}",
        "sampler.num_steps=2",
        f"out={tmp_path / 'h2'}",
    ]
    tuned = run_evaluation(compose_eval(overrides), overrides)
    assert tuned["num_steps"] == 2 and tuned["task"] == "compression"  # a checkpoint folder finds its run too
    assert tuned["heldout"]["eval_reward_mean"] != base["heldout"]["eval_reward_mean"]

    # the real entry point prints the numbers
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1"}
    args = [f"checkpoint={run_dir}", f"out={tmp_path / 'cli'}", "eval_seeds=1"]
    proc = run_entry(args, env, module="rlcm_exp.evaluate", timeout=300)  # its own (forked) process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out reward" in proc.stdout and (tmp_path / "cli" / "eval.json").is_file()


def test_merge_run_config_group_choice_and_key_overrides() -> None:
    composed = OmegaConf.create(
        {
            "model": {"name": "tiny"},
            "sampler": {"num_steps": 2, "eta": 1.0},
            "task": {"name": "aesthetic"},
            "reward": {"name": "aesthetic"},
            "seed": 0,
        }
    )
    run = OmegaConf.create(
        {
            "model": {"name": "toy"},
            "sampler": {"num_steps": 8, "eta": 0.5},
            "task": {"name": "compression"},
            "reward": {"name": "jpeg"},
            "algo": {"name": "ddpo"},
        }
    )
    merged = merge_run_config(composed, run, ["sampler.num_steps=2"])
    assert merged.model.name == "toy" and merged.task.name == "compression" and merged.reward.name == "jpeg"
    assert merged.sampler.num_steps == 2 and merged.sampler.eta == 0.5 and merged.algo.name == "ddpo"
    merged = merge_run_config(composed, run, ["task=aesthetic"])  # a task choice brings its reward
    assert (
        merged.task.name == "aesthetic" and merged.reward.name == "aesthetic" and merged.model.name == "toy"
    )


def fake_run(folder: Path, algo: str, steps: int, rewards: list[float], seconds_per_epoch: float) -> None:
    folder.mkdir(parents=True)
    cfg = {
        "algo": {"name": algo},
        "task": {"name": "compression"},
        "seed": 0,
        "sampler": {"num_steps": steps},
        "train": {"epochs": len(rewards)},
    }
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    lines = [
        {
            "epoch": e,
            "reward_mean": r,
            "wallclock_s": (e + 1) * seconds_per_epoch,
            "gpu_hours": (e + 1) * seconds_per_epoch / 3600,
            "reward_queries": (e + 1) * 16,
        }
        for e, r in enumerate(rewards)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.mark.subprocess
def test_compare_cli_draws_every_run_of_a_sweep(tmp_path, capsys) -> None:
    sweep = tmp_path / "multirun"
    fake_run(sweep / "0_algo=rlcm", "rlcm", 4, [-3.0, -2.0, -1.0], 1.0)
    fake_run(sweep / "1_algo=ddpo", "ddpo", 20, [-3.0, -2.5, -2.0], 5.0)
    (sweep / "not_a_run").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "rlcm_exp.compare", str(sweep)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    png = sweep / "compare.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from rlcm_exp.analysis.figures import compare_figure as compare
    from rlcm_exp.analysis.runs import find_runs, run_labels
    from rlcm_exp.compare import main

    # runs are named by what differs between them (algo, H), not by their long folder names
    assert run_labels(find_runs(sweep)) == [
        "algo.name=rlcm, sampler.num_steps=4",
        "algo.name=ddpo, sampler.num_steps=20",
    ]

    assert compare(sweep, tmp_path / "other.png").is_file()
    assert main([str(tmp_path / "not_a_run_either")]) == 2
    assert "no run folders" in capsys.readouterr().err

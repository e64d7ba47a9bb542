"""The whole loop, in process and through the real entry point; bad input gives one clear paragraph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlcm_exp.toy.detector import PARTS
from rlcm_exp.tracking import read_metrics

from .helpers import SMALL, TOY_SMALL, cli_env, run_entry, run_in_process

KEYS = {
    "epoch",
    "reward_mean",
    "reward_std",
    "approx_kl",
    "clipfrac",
    "ratio_mean",
    "ratio_first",
    "loss",
    "lr",
    "wallclock_s",
    "gpu_hours",
    "reward_queries",
    "time_sample_s",
    "time_reward_s",
    "time_train_s",
}


@pytest.mark.parametrize(
    ("extra", "transitions"),
    [
        ([], 3),
        (["train.train_batch_size=1", "train.samples_per_step=4"], 3),
        (["sampler.noisy_final_step=true", "train.train_batch_size=8", "train.samples_per_step=16"], 4),
        (["algo=ddpo", "sampler.num_steps=5"], 5),
        (["algo=ddpo", "sampler.num_steps=5", "sampler.guidance_scale=1.0"], 5),
    ],
)
def test_first_ratio_is_one_whatever_the_batching(tiny_cache, tmp_path, extra, transitions) -> None:
    # no held-out evaluation (before and after the epochs: it samples as many images as an epoch)
    records = run_in_process([*SMALL, "train.epochs=2", "train.eval_every=0", *extra], tmp_path)
    assert len(records) == 2
    for rec in records:
        # before any optimizer step, training recomputes exactly what sampling drew
        assert rec["ratio_first_max_dev"] <= 1e-5, rec["ratio_first_max_dev"]
        assert abs(rec["ratio_first"] - 1) <= 1e-5
    plan = json.loads((tmp_path / "batch_plan.json").read_text())
    assert plan["transitions_per_trajectory"] == transitions


@pytest.mark.subprocess
def test_smoke_run_writes_the_run_dir(tiny_cache, tmp_path) -> None:
    """The README's command, through the real entry point (python -m rlcm_exp)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rlcm_exp", *SMALL, "train.epochs=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in [
        "config.yaml",
        "git_commit.txt",
        "metrics.jsonl",
        "batch_plan.json",
        "samples/epoch_0000.png",
        "samples/epoch_0001.png",
        "checkpoints/final/pytorch_lora_weights.safetensors",
    ]:
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert set(records[0]) >= KEYS
    assert records[1]["reward_queries"] == 32 and records[1]["wallclock_s"] > records[0]["wallclock_s"]
    assert "reward (training round mean):" in proc.stdout and (run_dir / "reward_vs_time.png").is_file()


def run_cli(args: list[str], tmp_path: Path, tiny_cache: str) -> subprocess.CompletedProcess:
    """The entry point in its own process (forked from one that has imported it: helpers.run_entry)."""
    return run_entry([*args, f"hydra.run.dir={tmp_path / 'bad'}"], cli_env(tiny_cache), timeout=300)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([*SMALL, "sampler.num_steps=1"], "sampler.num_steps=1"),
        ([*SMALL, "train.sample_batch_size=5"], "train.sample_batch_size=5"),
        ([*SMALL, "train.samples_per_step=12"], "train.samples_per_step=12"),
        ([*SMALL, "task.prompts.name=dinosaurs"], "unknown prompt set 'dinosaurs'"),
        (
            [*SMALL, "model=dreamshaper_v7", "model.lcm.local_path=/nonexistent/lcm"],
            "model.lcm.local_path=/nonexistent/lcm",
        ),
        # 64 px: at the config's 768 px the memory model (on a CPU, against the host's free memory)
        # may refuse first, with its own one line, on a machine with under ~30 GiB free
        ([*SMALL, "model=dreamshaper_v7", "sampler.resolution=64"], "model=tiny"),
        ([*SMALL, "algo=ddpo", "sampler.eta=0.0"], "sampler.eta"),
    ],
)
def test_bad_input_is_one_clear_paragraph(tiny_cache, tmp_path, args, needle) -> None:
    proc = run_cli(args, tmp_path, tiny_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_user_reward_function_plugs_in_by_target(tiny_cache, tmp_path) -> None:
    records = run_in_process(
        [
            *SMALL,
            "train.epochs=1",
            "reward=custom",
            "reward._target_=tests.user_reward.mean_red",
            "+reward.weight=2.0",
        ],
        tmp_path,
    )
    assert 0.0 <= records[0]["reward_mean"] <= 2.0


@pytest.mark.subprocess
def test_side_by_side_sweep_shares_prompts_seeds_and_wandb_group(tiny_cache, tmp_path) -> None:
    """`-m algo=rlcm,ddpo`: one sweep folder, identical prompts and seeds, one wandb group."""
    sweep = tmp_path / "sweep"
    cmd = [
        "-m",
        "algo=rlcm,ddpo",
        *SMALL,
        "sampler.num_steps=4",
        "train.epochs=1",
        "train.dump_rollouts=true",
        "logger=wandb",
        "logger.mode=disabled",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = run_entry(cmd, cli_env(tiny_cache))  # its own process, forked from one that imported it
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 2
    import torch
    from omegaconf import OmegaConf

    groups = {OmegaConf.load(r / "config.yaml").logger.group for r in runs}
    assert groups == {f"sweep-{sweep.name}"}
    prompts = [torch.load(r / "rollouts" / "epoch0000_rank0.pt", weights_only=True)["prompts"] for r in runs]
    assert prompts[0] == prompts[1]
    assert {OmegaConf.load(r / "config.yaml").algo.name for r in runs} == {"rlcm", "ddpo"}
    keys = [set(read_metrics(r / "metrics.jsonl")[0]) for r in runs]
    assert keys[0] == keys[1] and keys[0] >= KEYS  # the same metrics, whatever the algorithm


def test_memory_options_keep_the_first_ratio_at_one(tiny_cache, tmp_path) -> None:
    records = run_in_process(
        [*SMALL, "train.epochs=1", "memory.gradient_checkpointing=true", "memory.channels_last=true"],
        tmp_path,
    )
    assert records[0]["ratio_first_max_dev"] <= 1e-5


def test_toy_alignment_logs_each_detector_part(tmp_path, capsys) -> None:  # noqa: ANN001
    """The detector's thirds (colour, shape, background) reach metrics.jsonl, eval.jsonl and the
    closing line, and average to the reward they make up: which attribute RL moved is on record."""
    records = run_in_process(
        [
            *TOY_SMALL,
            "train.epochs=1",
            "train.eval_every=1",
            "train.eval_seeds=1",
            "train.checkpoint_every=0",
        ],
        tmp_path,
    )
    for rec in records:
        assert abs(sum(rec[f"reward/{p}"] for p in PARTS) / 3 - rec["reward_mean"]) < 1e-5
    evals = read_metrics(tmp_path / "eval.jsonl")
    assert len(evals) == 2
    for ev in evals:
        assert all(0.0 <= ev[f"eval_reward/{p}"] <= 1.0 for p in PARTS)
        assert abs(sum(ev[f"eval_reward/{p}"] for p in PARTS) / 3 - ev["eval_reward_mean"]) < 1e-5
    closing = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("reward (training")
    )
    assert "held-out" in closing and ", shape " in closing

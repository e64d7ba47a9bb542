"""Nothing defeats preemption or hangs silently: every reward call is bounded by
train.reward_timeout_s (rewards/timeout.py), SIGTERM stops a run within seconds even while a reward
hangs in the trainer's reward thread (checkpointing the last finished epoch, exit 75), and sizes that
would allocate without bound are refused before anything is allocated.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.sampling import check_request
from rlcm_exp.rewards.timeout import RewardTimeout, TimedReward
from rlcm_exp.tracking import read_metrics

from .helpers import RESUMABLE, Entry, cli_env, run_in_process, train_subprocess

HANGING = ["reward=custom", "reward._target_=tests.user_reward.hangs", "train.eval_every=0"]


def test_a_reward_call_past_its_timeout_raises_and_errors_pass_through() -> None:
    def slow(images, prompts):
        time.sleep(30)  # left behind on its daemon thread

    def broken(images, prompts):
        raise KeyError("inside the reward")

    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(RewardTimeout, match=r"2 image\(s\) within train.reward_timeout_s=0.2 s"):
        TimedReward(slow, 0.2)(images, ["a", "b"])
    with pytest.raises(KeyError, match="inside the reward"):
        TimedReward(broken, 5.0)(images, ["a", "b"])
    assert TimedReward(lambda i, p: [1.0] * len(p), None)(images, ["a", "b"]) == [1.0, 1.0]


def test_a_hung_reward_stops_the_run_after_its_timeout(tiny_cache, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLCM_TEST_HANG_AFTER", "0")  # the first call hangs (for 20 s, on its own thread)
    monkeypatch.setenv("RLCM_TEST_HANG_S", "20")
    with pytest.raises(RewardTimeout, match="train.reward_timeout_s=0.5"):
        run_in_process([*RESUMABLE, *HANGING, "train.reward_timeout_s=0.5"], tmp_path / "run")


@pytest.mark.parametrize("override", ["train.samples_per_epoch=2000000000", "train.eval_seeds=1000000000"])
def test_sizes_in_the_billions_are_refused_before_anything_is_allocated(tmp_path, override) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}=\d+ .*is not valid: expected an integer >= 1 and <= \d+"):
        run_in_process([*RESUMABLE, override], tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        ({"images_per_prompt": 10**9}, "images_per_prompt=1000000000: at most 100,000"),
        ({"images_per_prompt": 1000, "prompts": ["a"] * 2000}, "2,000,000 images: at most 1,000,000"),
        ({"batch_size": 10**6}, "batch_size=1000000: at most 1024"),
    ],
)
def test_sample_sizes_are_bounded(request_, needle) -> None:
    cfg = OmegaConf.create(
        {"prompts": ["a cat"], "images_per_prompt": 1, "batch_size": 4, "seed": 0, **request_}
    )
    with pytest.raises(ConfigError, match=needle):
        check_request(cfg)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_stops_a_run_whose_reward_hangs_and_checkpoints_the_last_epoch(tiny_cache, tmp_path) -> None:
    run_dir, mark = tmp_path / "run", tmp_path / "hanging"
    argv = [*RESUMABLE, *HANGING, "train.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    env = {**cli_env(tiny_cache), "RLCM_TEST_HANG_AFTER": "2", "RLCM_TEST_HANG_MARK": str(mark)}
    proc = Entry(argv, env)  # epochs 0 and 1 score; epoch 2's reward call hangs for an hour
    deadline = time.monotonic() + 300
    while not mark.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.wait().stderr[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    res = proc.wait(timeout=60)
    assert res.returncode == 75, res.stderr[-2000:]  # not an hour: the reward is left behind
    assert "during epoch 2's sampling; checkpoint after epoch 1 written" in res.stderr
    state = json.loads((run_dir / "checkpoints" / "epoch_000002" / "state.json").read_text())
    assert state["epoch"] == 2 and [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]
    resumed = train_subprocess(run_dir, tiny_cache, *HANGING, "train.checkpoint_every=0", "resume=auto")
    assert "resumed from" in resumed.stdout
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_round_is_bounded_by_its_memory_estimate_worked_by_hand() -> None:
    """2 processes x 8 trajectories of T=3 transitions, 4x8x8 latents, 64 px images: each trajectory
    holds 7 latents of 256 values and 3 x 64 x 64 image values, 4 bytes each."""
    from rlcm_exp.training.batching import check_round_fits, plan_batches, round_bytes

    plan = plan_batches(
        world_size=2,
        samples_per_epoch=16,
        sample_batch_size=8,
        train_batch_size=8,
        samples_per_step=16,
        inner_epochs=1,
        transitions_per_trajectory=3,
        timestep_fraction=1.0,
    )
    per_trajectory = 4 * (7 * 256 + 3 * 64 * 64)  # 56,320 bytes
    assert round_bytes(plan, 256, 64) == 8 * per_trajectory
    check_round_fits(plan, 256, 64, available=8 * per_trajectory * 2)  # fits within 80%
    # 80% of 8 trajectories' bytes holds 6.4 per process: 6 x 2 processes
    with pytest.raises(ConfigError, match=r"train\.samples_per_epoch=16: .* at most about 12 fit"):
        check_round_fits(plan, 256, 64, available=8 * per_trajectory)


def test_a_round_larger_than_the_free_memory_is_refused_before_sampling(tmp_path) -> None:  # noqa: ANN001
    """Within the fixed bound (2^20) but not within this machine's memory for the toy model: refused
    naming the key, after the model loads and before the first round."""
    overrides = [
        "model=toy",
        "task=toy_compression",
        "train.epochs=1",
        f"train.samples_per_epoch={2**20}",
        "train.sample_batch_size=64",
    ]
    with pytest.raises(ConfigError, match=r"train\.samples_per_epoch=1048576: .* GiB free; at most about"):
        run_in_process(overrides, tmp_path)

"""What several test modules share: the tiny run's overrides, an in-process run, the CLI's environment.

Test modules import from here, never from one another; fixtures live in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

CONF = Path(__file__).resolve().parents[1] / "conf"
# a two-epoch-capable run on the random tiny family: seconds on one CPU core
SMALL = [
    "model=tiny",
    "task=compression",
    "sampler.num_steps=4",
    "train.samples_per_epoch=16",
    "train.sample_batch_size=8",
    "train.train_batch_size=4",
    "train.samples_per_step=8",
    "train.save_images=4",
]
# a 4-epoch tiny run that checkpoints and evaluates every 2 epochs: what resume and run-dir tests kill,
# refuse and resume
RESUMABLE = [
    "model=tiny", "task=compression", "sampler.num_steps=4", "train.samples_per_epoch=8",
    "train.sample_batch_size=8", "train.train_batch_size=4", "train.samples_per_step=8",
    "train.save_images=0", "train.epochs=4", "train.checkpoint_every=2", "train.eval_every=2",
    "train.eval_seeds=1", "optimizer.lr=0.01",
]  # fmt: skip
# metrics that differ between two runs of the same config (wall clock), left out when runs are compared
TIMING = {
    "wallclock_s",
    "gpu_hours",
    "time_sample_s",
    "time_reward_s",
    "time_reward_wait_s",
    "time_train_s",
    "time_eval_s",
}


def run_in_process(overrides: list[str], run_dir: Path) -> list[dict]:
    """A training run through the library (rlcm_exp.training.build.train), without the CLI."""
    from rlcm_exp.training.build import train

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return train(cfg, run_dir)


def cli_env(tiny_cache: str) -> dict[str, str]:
    """The environment of a `python -m rlcm_exp...` subprocess: offline, the session's tiny models,
    one intra-op thread (as the test process itself)."""
    return {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def train_subprocess(
    run_dir: Path, tiny_cache: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    """The RESUMABLE run through the real entry point (`python -m rlcm_exp`), `extra` overrides last."""
    argv = [sys.executable, "-m", "rlcm_exp", *RESUMABLE, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.run(
        argv, env=cli_env(tiny_cache), check=check, capture_output=True, text=True, timeout=600
    )

"""Fault tolerance: SIGKILL + resume=auto reproduces the uninterrupted run; SIGTERM checkpoints and exits 75;
a checkpoint that cannot be written (full or read-only folder) fails clearly and keeps the previous one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.checkpoint import (
    CheckpointError,
    is_complete,
    latest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)

from .test_cli import SMALL

RUN = [*SMALL, "train.epochs=4", "train.checkpoint_every=1", "optimizer.lr=0.01"]
TIMING = {
    "wallclock_s",
    "gpu_hours",
    "time_sample_s",
    "time_reward_s",
    "time_reward_wait_s",
    "time_train_s",
    "time_eval_s",
}


def cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlcm_exp", *RUN, *extra, f"hydra.run.dir={run_dir}"]


def env(tiny_cache: str) -> dict[str, str]:
    return {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(cmd(run_dir), env=env(tiny_cache), check=True, capture_output=True, timeout=600)
    return read_metrics(run_dir / "metrics.jsonl")


@pytest.mark.parametrize("kill_after", [1, 2])
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tiny_cache, tmp_path, reference, kill_after
) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir), env=env(tiny_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_lines(run_dir / "metrics.jsonl", kill_after, proc)
    time.sleep(random.Random(kill_after).uniform(0.0, 1.5))  # somewhere in the next epoch or its checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(
        cmd(run_dir, "resume=auto"), env=env(tiny_cache), check=True, capture_output=True, timeout=600
    )
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    assert without_timings(resumed) == without_timings(reference)


# EMA weights (train.ema_decay) evaluated every epoch: each record's eval_reward_mean is the EMA's
EMA = [
    "train.ema_decay=0.7",
    "train.eval_every=1",
    "train.eval_seeds=1",
    "task.eval_prompts.prompts=[a cat,a dog]",
]


@pytest.fixture(scope="module")
def ema_reference(tiny_cache, tmp_path_factory) -> tuple[list[dict], dict[str, torch.Tensor]]:
    run_dir = tmp_path_factory.mktemp("ema_reference")
    subprocess.run(cmd(run_dir, *EMA), env=env(tiny_cache), check=True, capture_output=True, timeout=600)
    return read_metrics(run_dir / "metrics.jsonl"), final_ema(run_dir)


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "final_ema" / "pytorch_lora_weights.safetensors")


def test_sigkill_then_resume_restores_the_ema_exactly(tiny_cache, tmp_path, ema_reference) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir, *EMA), env=env(tiny_cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_lines(run_dir / "metrics.jsonl", 2, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(
        cmd(run_dir, *EMA, "resume=auto"), env=env(tiny_cache), check=True, capture_output=True, timeout=600
    )
    records, reference_ema = ema_reference
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    assert all("eval_reward_mean" in r for r in resumed)  # scored with the EMA weights every epoch
    assert without_timings(resumed) == without_timings(records)
    resumed_ema = final_ema(run_dir)
    assert resumed_ema.keys() == reference_ema.keys()
    assert all(torch.equal(resumed_ema[k], reference_ema[k]) for k in resumed_ema)


def test_sigterm_checkpoints_and_exits_with_the_distinct_code(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir, "train.epochs=50", "train.checkpoint_every=0"),
        env=env(tiny_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(run_dir / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    ckpt = latest_checkpoint(run_dir, world_size=1)
    assert ckpt is not None and is_complete(ckpt, 1)
    epochs_done = read_checkpoint(ckpt, 0, torch.device("cpu"))["state"]["epoch"]
    assert len(read_metrics(run_dir / "metrics.jsonl")) == epochs_done < 50


def test_torn_checkpoint_is_skipped(tmp_path) -> None:
    good = tmp_path / "checkpoints" / "epoch_000001"
    torn = tmp_path / "checkpoints" / "epoch_000002"
    for folder in (good, torn):
        folder.mkdir(parents=True)
        for name in [
            "state.json",
            "optimizer.pt",
            "lr_scheduler.pt",
            "pytorch_lora_weights.safetensors",
            "rng_rank0.pt",
        ]:
            (folder / name).write_text("{}")
    (good / "COMPLETE").write_text("ok")  # the torn one never got its marker
    with pytest.warns(UserWarning, match="epoch_000002"):
        assert latest_checkpoint(tmp_path, 1) == good


def _write(folder: Path, unet: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> Path:
    return write_checkpoint(
        folder,
        is_main=True,
        rank=0,
        unet=unet,
        optimizer=opt,
        lr_scheduler=sched,
        scaler=None,
        state={"epoch": int(folder.name[-1]), "world_size": 1},
        barrier=lambda: None,
        keep_last=3,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_unwritable_checkpoint_folder_fails_clearly_and_keeps_the_previous(
    tiny_family, tmp_path, failure
) -> None:
    from rlcm_exp.models import attach_lora
    from rlcm_exp.policies.lcm import build_lcm_policy

    unet = build_lcm_policy(tiny_family, num_steps=2).denoiser
    params = attach_lora(unet, 4, 4, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    opt = torch.optim.Adam(params)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, 10)
    root = tmp_path / "checkpoints"
    root.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(root)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        first = _write(root / "epoch_000001", unet, opt, sched)
        if failure == "full":
            st = os.statvfs(root)
            (root / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8192))  # leave two pages
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(CheckpointError, match="epoch_000002.*previous checkpoint"):
            _write(root / "epoch_000002", unet, opt, sched)
        assert is_complete(first, 1) and latest_checkpoint(tmp_path, 1) == first
        read_checkpoint(first, 0, torch.device("cpu"))  # still loadable
        assert not (root / "epoch_000002").exists() and not (root / "epoch_000002.tmp").exists()
    finally:
        subprocess.run(["umount", "-l", str(root)])

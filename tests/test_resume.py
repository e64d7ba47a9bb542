"""Fault tolerance: a run killed (SIGKILL) at any moment, then resumed with resume=auto, writes what an
uninterrupted run does (metrics, evaluations and the EMA weights); SIGTERM checkpoints and exits 75; a
checkpoint that cannot be written (full or read-only folder) fails clearly and keeps the previous one;
a checkpoint that is torn or whose files do not load is skipped.

The kill-and-resume runs share one module-scoped reference run, so they stay on one xdist worker.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
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

from .helpers import RESUMABLE, Entry, cli_env, run_entry, train_subprocess, without_timings

pytestmark = pytest.mark.xdist_group("kill_resume")

# Runs the real entry point (helpers.Entry: a child process forked from one that has imported the
# package) in a process that SIGKILLs itself at a chosen moment: KILL_AT=point:n
# kills at the n-th time the point is reached (a torn metrics line, mid-checkpoint, ...).
DRIVER = r"""
import json, os, signal, sys
import rlcm_exp.tracking as tracking
import rlcm_exp.training.checkpoint as checkpoint
import rlcm_exp.training.trainer as trainer

point, n = os.environ["KILL_AT"].split(":")
n, seen = int(n), {"count": 0}

def reached() -> bool:
    seen["count"] += 1
    return seen["count"] == n

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)

def patch_write(name: str, torn: bool):
    original = tracking.MetricsFile.write
    def write(self, record):
        if self.path.name == name and self.enabled and reached():
            if torn:  # half a line on disk, then the kill
                with self.path.open("a") as f:
                    line = json.dumps(record)
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
            else:
                original(self, record)
            die()
        original(self, record)
    tracking.MetricsFile.write = write

def after(module, name: str):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        out = original(*args, **kwargs)
        if reached():
            die()
        return out
    setattr(module, name, wrapped)

if point == "metrics_torn": patch_write("metrics.jsonl", torn=True)
if point == "metrics_after": patch_write("metrics.jsonl", torn=False)
if point == "eval_torn": patch_write("eval.jsonl", torn=True)
if point == "checkpoint_mid": after(checkpoint, "write_lora_weights")  # LoRA in the .tmp, no COMPLETE
if point == "checkpoint_prune":  # renamed into place, older ones not yet pruned
    original_prune = checkpoint._prune
    def prune(*args):
        if reached():
            die()
        original_prune(*args)
    checkpoint._prune = prune
if point == "final_lora": after(trainer, "save_lora")

import rlcm_exp.__main__ as entry
sys.argv = ["rlcm_exp", *json.loads(sys.argv[1])]
entry.main()
"""

KILL_POINTS = [
    "metrics_torn:1",  # the first epoch's metrics line half written
    "metrics_torn:3",
    "metrics_after:1",  # after epoch 0, before the first checkpoint
    "eval_torn:2",  # the held-out evaluation after epoch 2, half written
    "checkpoint_mid:1",  # during the first checkpoint write
    "checkpoint_mid:2",
    "checkpoint_prune:1",
    "final_lora:1",  # during the final LoRA save
    "random:1",  # the parent kills at a random moment of epoch 1 (or later)
    "random:2",  # ... of the checkpoint after epoch 2, or epoch 2 (or later)
]
# EMA weights (train.ema_decay) evaluated every epoch: each record's eval_reward_mean is the EMA's
EMA = [
    "train.ema_decay=0.7",
    "train.eval_every=1",
    "train.eval_seeds=1",
    "task.eval_prompts.prompts=[a cat,a dog]",
]


def wait_for_lines(path: Path, n: int, proc: Entry, timeout: float = 180) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.wait().stderr[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


def killed_run(run_dir: Path, tiny_cache: str, point: str, *extra: str) -> None:
    """The run killed at `point`: a driver that SIGKILLs itself there, or (random:n) the parent
    killing it a random 0-1.5 s after the n-th metrics line."""
    name, n = point.split(":")
    argv = [*RESUMABLE, *extra, f"hydra.run.dir={run_dir}"]
    if name == "random":
        proc = Entry(argv, cli_env(tiny_cache))
        wait_for_lines(run_dir / "metrics.jsonl", int(n), proc)
        time.sleep(random.Random(int(n)).uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait().returncode == -signal.SIGKILL, f"the run ended before the kill ({point})"
        return
    res = run_entry(argv, {**cli_env(tiny_cache), "KILL_AT": point}, driver=DRIVER)
    assert res.returncode == -signal.SIGKILL, f"{point} was never reached: {res.stderr[-2000:]}"


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "final_ema" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    run_dir = tmp_path_factory.mktemp("reference")
    train_subprocess(run_dir, tiny_cache)
    return read_metrics(run_dir / "metrics.jsonl"), read_metrics(run_dir / "eval.jsonl")


@pytest.mark.subprocess
@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(
    tiny_cache, tmp_path, reference, point
) -> None:
    run_dir = tmp_path / "run"
    killed_run(run_dir, tiny_cache, point)
    train_subprocess(run_dir, tiny_cache, "resume=auto")
    metrics, evals = read_metrics(run_dir / "metrics.jsonl"), read_metrics(run_dir / "eval.jsonl")
    assert [r["epoch"] for r in metrics] == [0, 1, 2, 3]
    assert without_timings(metrics) == without_timings(reference[0])
    assert without_timings(evals) == without_timings(reference[1])


@pytest.mark.subprocess
def test_killed_then_resumed_restores_the_ema_exactly(tiny_cache, tmp_path_factory) -> None:
    """Killed after epoch 2's metrics line: the resume restores the EMA from the epoch-2 checkpoint."""
    ref_dir, run_dir = tmp_path_factory.mktemp("ema_reference"), tmp_path_factory.mktemp("ema") / "run"
    train_subprocess(ref_dir, tiny_cache, *EMA)
    killed_run(run_dir, tiny_cache, "metrics_after:3", *EMA)
    train_subprocess(run_dir, tiny_cache, *EMA, "resume=auto")
    records, resumed = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    assert all("eval_reward_mean" in r for r in resumed)  # scored with the EMA weights every epoch
    assert without_timings(resumed) == without_timings(records)
    resumed_ema, reference_ema = final_ema(run_dir), final_ema(ref_dir)
    assert resumed_ema.keys() == reference_ema.keys()
    assert all(torch.equal(resumed_ema[k], reference_ema[k]) for k in resumed_ema)


@pytest.mark.subprocess
def test_a_checkpoint_whose_files_do_not_load_falls_back_to_the_previous_one(
    tiny_cache, tmp_path, reference
) -> None:
    run_dir = tmp_path / "run"
    train_subprocess(run_dir, tiny_cache)  # checkpoints after epochs 2 and 4
    newest = run_dir / "checkpoints" / "epoch_000004"
    for name in ("optimizer.pt", "pytorch_lora_weights.safetensors"):
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])  # truncated, COMPLETE still there
    res = train_subprocess(run_dir, tiny_cache, "train.epochs=5", "resume=auto")
    assert "does not load" in res.stderr and "epoch_000004" in res.stderr
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [0, 1, 2, 3, 4]
    assert without_timings(metrics[:4]) == without_timings(reference[0])


@pytest.mark.subprocess
def test_sigterm_checkpoints_and_exits_with_the_distinct_code(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "run"
    argv = [*RESUMABLE, "train.epochs=50", "train.checkpoint_every=0", f"hydra.run.dir={run_dir}"]
    proc = Entry(argv, cli_env(tiny_cache))
    wait_for_lines(run_dir / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    res = proc.wait(timeout=120)
    assert res.returncode == 75, res.stderr[-2000:]
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

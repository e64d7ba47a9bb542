"""Nothing lost, no runs mixed: a run dir holding a run refuses a fresh run; a resume must be the same
run; records on disk match the checkpoint resumed from; a checkpoint whose files do not load is
skipped; and a run killed (SIGKILL) at any moment, then resumed, writes what an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcm_exp.tracking import read_metrics

from .test_resume import env, without_timings

RUN = [
    "model=tiny", "task=compression", "sampler.num_steps=4", "train.samples_per_epoch=8",
    "train.sample_batch_size=8", "train.train_batch_size=4", "train.samples_per_step=8",
    "train.save_images=0", "train.epochs=4", "train.checkpoint_every=2", "train.eval_every=2",
    "train.eval_seeds=1", "optimizer.lr=0.01",
]  # fmt: skip

# Runs the real entry point in a process that SIGKILLs itself at a chosen moment: KILL_AT=point:n
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
    "random:1",  # the parent kills at a random moment
    "random:2",
]


def run(run_dir: Path, tiny_cache: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "rlcm_exp", *RUN, *extra, f"hydra.run.dir={run_dir}"]
    return subprocess.run(argv, env=env(tiny_cache), check=check, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory) -> tuple[list[dict], list[dict]]:
    run_dir = tmp_path_factory.mktemp("reference")
    run(run_dir, tiny_cache)
    return read_metrics(run_dir / "metrics.jsonl"), read_metrics(run_dir / "eval.jsonl")


def killed_run(run_dir: Path, tiny_cache: str, point: str) -> None:
    name, n = point.split(":")
    argv = [*RUN, f"hydra.run.dir={run_dir}"]
    if name == "random":
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlcm_exp", *argv], env=env(tiny_cache), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        while proc.poll() is None and not (run_dir / "metrics.jsonl").is_file():
            time.sleep(0.02)
        time.sleep(random.Random(int(n)).uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return
    proc2 = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argv)], env={**env(tiny_cache), "KILL_AT": point},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc2.returncode == -signal.SIGKILL, f"{point} was never reached: {proc2.stderr[-2000:]}"


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_then_resumed_equals_an_uninterrupted_run(
    tiny_cache, tmp_path, reference, point
) -> None:
    run_dir = tmp_path / "run"
    killed_run(run_dir, tiny_cache, point)
    run(run_dir, tiny_cache, "resume=auto")
    metrics, evals = read_metrics(run_dir / "metrics.jsonl"), read_metrics(run_dir / "eval.jsonl")
    assert [r["epoch"] for r in metrics] == [0, 1, 2, 3]
    assert without_timings(metrics) == without_timings(reference[0])
    assert without_timings(evals) == without_timings(reference[1])


def digest(run_dir: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        for name in ("config.yaml", "metrics.jsonl", "eval.jsonl")
    }


def test_a_fresh_run_into_a_run_dir_is_refused(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, tiny_cache, "train.epochs=2")
    before = digest(run_dir)
    res = run(run_dir, tiny_cache, "train.epochs=2", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "resume=auto" in res.stderr and "hydra.run.dir" in res.stderr
    assert digest(run_dir) == before  # nothing overwritten, nothing appended


@pytest.mark.parametrize(
    ("change", "key"),
    [("task=incompression", "reward._target_"), ("algo.lora.rank=4", "algo.lora.rank"), ("seed=1", "seed")],
)
def test_a_resume_with_another_config_is_refused_before_anything_is_written(
    tiny_cache, tmp_path, change, key
) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, tiny_cache, "train.epochs=2")
    before = digest(run_dir)
    res = run(run_dir, tiny_cache, "train.epochs=3", "resume=auto", change, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert key in res.stderr and "resume" in res.stderr
    assert digest(run_dir) == before


def test_a_resume_may_lengthen_the_run(tiny_cache, tmp_path, reference) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, tiny_cache, "train.epochs=2")
    run(run_dir, tiny_cache, "resume=auto")  # train.epochs back to 4: allowed
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_checkpoint_whose_files_do_not_load_falls_back_to_the_previous_one(
    tiny_cache, tmp_path, reference
) -> None:
    run_dir = tmp_path / "run"
    run(run_dir, tiny_cache)  # checkpoints after epochs 2 and 4
    newest = run_dir / "checkpoints" / "epoch_000004"
    for name in ("optimizer.pt", "pytorch_lora_weights.safetensors"):
        data = (newest / name).read_bytes()
        (newest / name).write_bytes(data[: len(data) // 2])  # truncated, COMPLETE still there
    res = run(run_dir, tiny_cache, "train.epochs=5", "resume=auto")
    assert "does not load" in res.stderr and "epoch_000004" in res.stderr
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in metrics] == [0, 1, 2, 3, 4]
    assert without_timings(metrics[:4]) == without_timings(reference[0])


def test_a_torn_last_line_is_dropped(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    with pytest.warns(UserWarning, match="torn"):
        assert read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]


@pytest.mark.parametrize("bad", ["/proc/no_such/run", "FILE/sub"])
def test_a_run_dir_that_cannot_be_created_is_one_line(tiny_cache, tmp_path, bad) -> None:
    (tmp_path / "FILE").write_text("a file, not a folder")
    bad = bad.replace("FILE", str(tmp_path / "FILE"))
    res = subprocess.run(
        [sys.executable, "-m", "rlcm_exp", "model=tiny", "task=compression", f"hydra.run.dir={bad}"],
        env=env(tiny_cache), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hydra.run.dir" in res.stderr and "cannot be created" in res.stderr

"""The SLURM launcher's path (hydra/launcher=slurm is submitit_slurm) exercised through submitit's
local executor (`hydra/launcher=submitit_local`): a sweep point becomes a submitit job in its own
process, trains through the real entry point and writes its run dir under the sweep folder
(issue 29); a job signalled as submitit signals a preempted or timed-out SLURM job (SIGUSR2)
checkpoints, is requeued by submitit, resumes from its checkpoint and ends with the metrics of an
uninterrupted run. A real cluster's scontrol requeue is not exercised here."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import TOY_SMALL, cli_env, run_in_process, without_timings

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.slow  # a submitit job: its own Python process, imports and one toy epoch (~30-60 s, 2 cores)
@pytest.mark.subprocess
def test_a_sweep_through_submitits_local_executor_trains(tiny_cache, tmp_path) -> None:
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-m", "rlcm_exp", "-m", "hydra/launcher=submitit_local", *TOY_SMALL]
    argv += ["train.epochs=1", "train.eval_every=0", "seed=3", f"hydra.sweep.dir={sweep}"]
    argv += [
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
    ]
    proc = subprocess.run(argv, env=cli_env(tiny_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p.parent for p in sweep.glob("*/metrics.jsonl")]  # one sweep point, one run dir
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 0
    assert list(sweep.glob(".submitit/*/*_result.pkl")), "the job ran under submitit"


LOCAL_JOB = [
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.cpus_per_task=1",
]


def _signal_the_job_after_its_first_checkpoint(sweep: Path, proc: subprocess.Popen) -> None:
    """SIGUSR2 (submitit's preemption and timeout signal) to the job's task process, the child of
    submitit's local controller (its pid is the job id), once epoch 0's checkpoint exists."""
    deadline = time.time() + 300
    while not list(sweep.glob("*/checkpoints/*/*")) or not list(sweep.glob(".submitit/*/")):
        assert proc.poll() is None and time.time() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.05)
    (job_dir,) = [p for p in sweep.glob(".submitit/*") if p.name.isdigit()]
    for task in psutil.Process(int(job_dir.name)).children():
        task.send_signal(signal.SIGUSR2)


@pytest.mark.slow  # two submitit starts of a toy run (~90 s on 2 cores)
@pytest.mark.subprocess
def test_a_preempted_submitit_job_is_requeued_and_resumes_to_the_same_metrics(tiny_cache, tmp_path) -> None:
    run = [*TOY_SMALL, "train.epochs=3", "train.eval_every=0", "train.checkpoint_every=1", "seed=3"]
    sweep = tmp_path / "sweep"
    argv = [sys.executable, "-m", "rlcm_exp", "-m", "hydra/launcher=submitit_local", *run, "resume=auto"]
    argv += [f"hydra.sweep.dir={sweep}", *LOCAL_JOB]
    proc = subprocess.Popen(
        argv, env=cli_env(tiny_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _signal_the_job_after_its_first_checkpoint(sweep, proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs and "stopped by a signal" in logs, logs[-3000:]
    assert "resumed from" in logs, logs[-3000:]
    (job,) = [p.parent for p in sweep.glob("*/metrics.jsonl")]
    records = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = run_in_process(run, tmp_path / "uninterrupted")
    assert [r["epoch"] for r in records] == list(range(3))
    assert without_timings(records) == without_timings(uninterrupted)

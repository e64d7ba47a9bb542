"""The SLURM launcher's path (hydra/launcher=slurm is submitit_slurm) exercised through submitit's
local executor (`hydra/launcher=submitit_local`): a sweep point becomes a submitit job in its own
process, trains through the real entry point and writes its run dir under the sweep folder
(issue 29). Preemption and requeue on a real cluster are not exercised here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import TOY_SMALL, cli_env

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

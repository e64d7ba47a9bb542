"""device=job's GPU lease (training/gpu_lease.py), with real processes on the CPU: jobs leasing from
2 slots never hold one slot at once, a job that finds both taken waits and gets the slot freed
first (out of order: the later job's), and a bounded wait ends in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlcm_exp.errors import ConfigError
from rlcm_exp.training.gpu_lease import gpu_lease
from tests.helpers import ROOT

JOB = """
import json, sys, time
from pathlib import Path
from rlcm_exp.training.gpu_lease import gpu_lease
folder, name, hold_s, out = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
with gpu_lease(folder, 2, poll_s=0.02) as slot:
    start = time.time()
    time.sleep(hold_s)
    while (out.parent / f"release_{name}").exists() is False and hold_s == 0:  # held until released
        time.sleep(0.02)
    end = time.time()
out.write_text(json.dumps({"name": name, "slot": slot, "start": start, "end": end}))
"""


def _job(folder: Path, name: str, hold_s: float, tmp_path: Path) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    args = [sys.executable, "-c", JOB, str(folder), name, str(hold_s), str(tmp_path / f"{name}.json")]
    return subprocess.Popen(args, env=env)


def _started(tmp_path: Path, folder: Path, slots: int) -> None:
    """Wait until `slots` lock files are held (each job writes its pid into its slot once locked)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        held = [p for p in folder.glob("gpu-*.lock") if p.read_text().strip()]
        if len(held) >= slots:
            return
        time.sleep(0.02)
    raise AssertionError("the jobs did not lease their slots")


def test_jobs_never_share_a_slot_and_a_waiting_job_gets_the_first_freed(tmp_path) -> None:
    folder = tmp_path / "leases"
    long_job = _job(folder, "a", 0, tmp_path)  # slot 0, held until the others are done
    _started(tmp_path, folder, 1)
    short_job = _job(folder, "b", 0.3, tmp_path)  # slot 1, finishes first
    _started(tmp_path, folder, 2)
    waiting = [_job(folder, name, 0.2, tmp_path) for name in ("c", "d")]  # both slots held: they wait
    for proc in (short_job, *waiting):
        assert proc.wait(timeout=60) == 0
    (tmp_path / "release_a").touch()
    assert long_job.wait(timeout=60) == 0
    runs = {r["name"]: r for r in (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))}
    assert runs["a"]["slot"] == 0 and runs["b"]["slot"] == 1
    # job number mod 2 would put c on slot 0, beside a: the lease gives it b's freed slot
    assert runs["c"]["slot"] == 1 and runs["d"]["slot"] == 1
    for x in runs.values():  # no two jobs on one slot at once
        for y in runs.values():
            if x is not y and x["slot"] == y["slot"]:
                assert x["end"] <= y["start"] or y["end"] <= x["start"], (x, y)


def test_a_bounded_wait_ends_in_one_line_and_the_lease_ends_with_its_block(tmp_path) -> None:
    folder = tmp_path / "leases"
    with gpu_lease(folder, 1) as slot:
        assert slot == 0
        busy = r"^device=job: all 1 GPU\(s\) leased in .*n_jobs"
        with pytest.raises(ConfigError, match=busy), gpu_lease(folder, 1, timeout_s=0.1, poll_s=0.02):
            pass
    with gpu_lease(folder, 1, timeout_s=0) as slot:  # released at the block's end
        assert slot == 0
    with pytest.raises(ConfigError, match="at least one visible CUDA GPU"), gpu_lease(folder, 0):
        pass

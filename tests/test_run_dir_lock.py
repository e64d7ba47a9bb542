"""A run dir belongs to one process (training/runlock.py): a second run or a second resume=auto into a
live run's folder is refused with one line, the lock goes with the process that held it (SIGKILL
included), two starts racing into one new folder give one run, a failed start's clean-up never
deletes a folder another process holds, and a fresh run never overwrites a user's same-named files.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlcm_exp.errors import ConfigError
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training import runlock

from .helpers import RESUMABLE, Entry, cli_env, run_in_process, train_subprocess


def start(run_dir: Path, tiny_cache: str, *extra: str) -> Entry:
    """The RESUMABLE run started through the entry point in its own process (forked: helpers.Entry)."""
    return Entry([*RESUMABLE, *extra, f"hydra.run.dir={run_dir}"], cli_env(tiny_cache))


def wait_for_epoch(run_dir: Path, proc: Entry, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and path.read_text().count("\n") >= 1:
            return
        assert proc.poll() is None, f"the run ended early: {proc.wait().stderr[-2000:]}"
        time.sleep(0.05)
    raise AssertionError("no epoch finished in time")


@pytest.mark.subprocess
@pytest.mark.slow
def test_a_second_run_or_resume_beside_a_live_run_is_refused_and_the_lock_dies_with_it(
    tiny_cache, tmp_path
) -> None:
    run_dir = tmp_path / "run"
    first = start(run_dir, tiny_cache, "train.epochs=200", "train.checkpoint_every=0")
    try:
        wait_for_epoch(run_dir, first)
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        for extra in ((), ("resume=auto",)):
            res = train_subprocess(run_dir, tiny_cache, "train.epochs=200", *extra, check=False)
            lines = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
            assert f"process {first.pid}" in lines[0] and "in use by a live run" in lines[0]
        # the refused processes wrote nothing, Hydra's copies of the live run's config included
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files
        with pytest.raises(runlock.RunDirBusy):
            runlock.acquire(run_dir)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    key = runlock.acquire(run_dir)  # the kernel released the dead process's lock: nothing stale
    runlock.release(key)


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_starts_at_the_same_moment_make_one_run(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "new" / "run"  # neither exists: both starts would create it
    procs = [start(run_dir, tiny_cache, "train.epochs=2") for _ in range(2)]
    results = [p.wait(timeout=300) for p in procs]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr[-1500:] for r in results]
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1]  # each epoch once
    assert (run_dir / "checkpoints" / "final").is_dir()


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from rlcm_exp.training import runlock
    runlock.acquire(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(120)
    """
)


@pytest.mark.subprocess
def test_a_failed_start_never_removes_a_folder_another_process_holds(tiny_cache, tmp_path) -> None:
    from rlcm_exp.__main__ import clean_up_unstarted

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("{}\n")  # only Hydra's files: an unstarted run's
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], env=cli_env(tiny_cache), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        clean_up_unstarted(run_dir, "__main__.log", date_folder=False)
        assert (run_dir / ".hydra" / "config.yaml").is_file()  # the other process's folder stays
    finally:
        holder.kill()
        holder.wait()
    clean_up_unstarted(run_dir, "__main__.log", date_folder=False)  # nobody holds it: an unstarted run
    assert not run_dir.exists()


def test_a_fresh_run_never_overwrites_a_users_files(tiny_cache, tmp_path) -> None:
    run_dir = tmp_path / "mine"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "epoch_0000.png").write_bytes(b"my picture")
    (run_dir / "git_commit.txt").write_text("my notes\n")
    with pytest.raises(ConfigError, match="git_commit.txt, samples but no run"):
        run_in_process([*RESUMABLE, "train.epochs=1"], run_dir)
    assert (run_dir / "samples" / "epoch_0000.png").read_bytes() == b"my picture"
    assert (run_dir / "git_commit.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["git_commit.txt", "samples"]  # no lock file left

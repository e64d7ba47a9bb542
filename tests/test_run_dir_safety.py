"""Nothing lost, no runs mixed: a run dir holding a run refuses a fresh run; a resume must be the same
run and may lengthen it; a run dir that cannot be created is one line. (Killed-then-resumed runs and
checkpoints that do not load: test_resume.py.)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from rlcm_exp.tracking import read_metrics

from .helpers import cli_env, run_entry, train_subprocess


@pytest.fixture(scope="module")
def two_epochs(tiny_cache, tmp_path_factory) -> Path:
    """The first two epochs of the RESUMABLE run (checkpointed after epoch 2), run once for the module:
    each test refuses or resumes its own copy (a run's folder holds no path of its own)."""
    run_dir = tmp_path_factory.mktemp("two_epochs") / "run"
    train_subprocess(run_dir, tiny_cache, "train.epochs=2")
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run", symlinks=True))


def digest(run_dir: Path) -> dict[str, str]:
    return {
        name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        for name in ("config.yaml", "metrics.jsonl", "eval.jsonl")
    }


@pytest.mark.subprocess
def test_a_fresh_run_into_a_run_dir_is_refused(tiny_cache, tmp_path, two_epochs) -> None:
    run_dir = copy_of(two_epochs, tmp_path)
    before = digest(run_dir)
    res = train_subprocess(run_dir, tiny_cache, "train.epochs=2", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "resume=auto" in res.stderr and "hydra.run.dir" in res.stderr
    assert digest(run_dir) == before  # nothing overwritten, nothing appended


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("change", "key"),
    [("task=incompression", "reward._target_"), ("algo.lora.rank=4", "algo.lora.rank"), ("seed=1", "seed")],
)
def test_a_resume_with_another_config_is_refused_before_anything_is_written(
    tiny_cache, tmp_path, two_epochs, change, key
) -> None:
    run_dir = copy_of(two_epochs, tmp_path)
    before = digest(run_dir)
    res = train_subprocess(run_dir, tiny_cache, "train.epochs=3", "resume=auto", change, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert key in res.stderr and "resume" in res.stderr
    assert digest(run_dir) == before


@pytest.mark.subprocess
def test_a_resume_may_lengthen_the_run(tiny_cache, tmp_path, two_epochs) -> None:
    run_dir = copy_of(two_epochs, tmp_path)
    train_subprocess(run_dir, tiny_cache, "resume=auto")  # train.epochs back to 4: allowed
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2, 3]


def test_a_torn_last_line_is_dropped(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')
    with pytest.warns(UserWarning, match="torn"):
        assert read_metrics(path) == [{"epoch": 0}, {"epoch": 1}]


@pytest.mark.subprocess
@pytest.mark.parametrize("bad", ["/proc/no_such/run", "FILE/sub"])
def test_a_run_dir_that_cannot_be_created_is_one_line(tiny_cache, tmp_path, bad) -> None:
    (tmp_path / "FILE").write_text("a file, not a folder")
    bad = bad.replace("FILE", str(tmp_path / "FILE"))
    res = run_entry(
        ["model=tiny", "task=compression", f"hydra.run.dir={bad}"], cli_env(tiny_cache), timeout=120
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hydra.run.dir" in res.stderr and "cannot be created" in res.stderr

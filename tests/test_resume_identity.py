"""A resume proves it is the same run: each checkpoint carries its run's id and defining config
(training/rundir.py run_identity), so a resume under another config is refused naming the keys even
with config.yaml deleted, and another run's checkpoint is refused; checkpoint files carry checksums
(a flipped bit falls back to the checkpoint before, with a warning); a damaged line in the middle of
metrics.jsonl is an error, only a torn last line is a torn write.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlcm_exp.errors import CheckpointError, ConfigError
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.checkpoint import read_checkpoint, verify_checksums

from .helpers import RESUMABLE, run_in_process

# two epochs, a checkpoint after each, no held-out evaluation: the cheapest run with two checkpoints
RUN = [*RESUMABLE, "train.epochs=2", "train.checkpoint_every=1", "train.eval_every=0"]


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory) -> Path:
    """RUN, in process: checkpoints after epochs 1 and 2."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_in_process(RUN, run_dir)
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def digests(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir() if p.is_file()}


def test_each_checkpoint_carries_its_runs_identity(finished) -> None:
    states = [json.loads(p.read_text()) for p in sorted(finished.glob("checkpoints/epoch_*/state.json"))]
    assert len(states) == 2 and states[0]["run"] == states[1]["run"]
    run = states[0]["run"]
    assert len(run["run_id"]) == 32 and run["config"]["seed"] == 42 and "train.epochs" not in run["config"]
    assert run["config"]["reward._target_"].endswith("jpeg_compressibility")


def test_a_resume_under_another_config_is_refused_even_without_config_yaml(finished, tmp_path) -> None:
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "config.yaml").unlink()
    before = digests(run_dir)
    with pytest.raises(
        ConfigError, match=r"another run: 3 key\(s\).*reward\._target_.*seed: 42 -> 1; task.name"
    ):
        run_in_process([*RUN, "task=incompression", "seed=1", "train.epochs=3", "resume=auto"], run_dir)
    assert digests(run_dir) == before  # refused before anything was written: no new config.yaml


def test_another_runs_checkpoint_is_refused(finished, tmp_path) -> None:
    checkpoint = finished / "checkpoints" / "epoch_000001"
    with pytest.raises(ConfigError, match="checkpoint is of run [0-9a-f]{32} in .*finished"):
        run_in_process([*RUN, f"resume={checkpoint}"], tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "config.yaml").exists()


def test_a_flipped_bit_is_detected_and_the_checkpoint_before_used(finished, tmp_path) -> None:
    run_dir = copy_of(finished, tmp_path)
    newest = run_dir / "checkpoints" / "epoch_000002" / "optimizer.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, still loads: only the checksum tells
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt: checksum mismatch"):
        verify_checksums(newest.parent)
    with pytest.warns(UserWarning, match="epoch_000002 does not load.*checksum mismatch"):
        records = run_in_process([*RUN, "resume=auto"], run_dir)
    assert [r["epoch"] for r in records] == [1]  # epoch 1 trained again, from epoch 1's checkpoint
    assert read_checkpoint(run_dir / "checkpoints" / "epoch_000002", 0, torch.device("cpu"))


def test_a_damaged_line_in_the_middle_of_metrics_is_an_error(finished, tmp_path) -> None:
    run_dir = copy_of(finished, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[0] = lines[0][: len(lines[0]) // 2] + "\n"  # the first of two: not a torn last line
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ConfigError, match="metrics.jsonl: line 1 is not a JSON record and is not the last"):
        read_metrics(run_dir / "metrics.jsonl")
    before = digests(run_dir)
    with pytest.raises(ConfigError, match="line 1"):
        run_in_process([*RUN, "train.epochs=3", "resume=auto"], run_dir)
    assert digests(run_dir) == before

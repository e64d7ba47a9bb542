"""A diverged run stops (training/divergence.py): non-finite loss, gradients, weights or ratio_first
end the run naming the epoch and the likely cause; nothing of that epoch is recorded or checkpointed,
and the run is marked (diverged.json) so that a sweep table never ranks it as a result.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlcm_exp.analysis.runs import find_runs
from rlcm_exp.analysis.sweep import write_sweep_tables
from rlcm_exp.tracking import diverged_at, read_metrics
from rlcm_exp.training.divergence import Diverged, nonfinite

from .helpers import TOY_SMALL, run_in_process


def test_nonfinite_names_what_is_not_finite() -> None:
    finite = [torch.ones(3)]
    stats = {"loss": math.nan, "grad_norm": math.inf, "ratio_first": 1.0, "kl_to_base": math.nan}
    assert nonfinite(stats, finite, grads_checked=False) == ["loss nan"]  # fp16 scaler: inf grads skip
    assert nonfinite(stats, finite, grads_checked=True) == ["loss nan", "grad_norm inf"]
    assert nonfinite({"loss": 0.1, "ratio_first": -math.inf}, finite, True) == ["ratio_first -inf"]
    assert nonfinite({"loss": 0.1}, [torch.tensor([1.0, math.nan])], True) == ["weights"]
    assert nonfinite({"loss": 0.1, "grad_norm": 2.0, "ratio_first": 1.0}, finite, True) == []


def test_a_learning_rate_of_1e30_stops_the_run_and_no_summary_ranks_it(tmp_path) -> None:
    run_dir = tmp_path / "sweep" / "lr_1e30"
    with pytest.raises(Diverged, match=r"diverged at epoch 1: non-finite loss nan.*optimizer\.lr=1e\+30"):
        run_in_process([*TOY_SMALL, "optimizer.lr=1e30", "train.epochs=4"], run_dir)
    assert [r["epoch"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0]  # epoch 1 not recorded
    assert not (run_dir / "checkpoints").exists()  # neither checkpointed nor a final LoRA
    assert diverged_at(run_dir) == 1
    md, _ = write_sweep_tables(find_runs(tmp_path / "sweep"), tmp_path / "sweep", tmp_path / "table")
    assert "DIVERGED at epoch 1" in md.read_text()

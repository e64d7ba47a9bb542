"""The end-of-run summary in the run dir: reward_vs_time.png, before_after.png and one printed line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlcm_exp.analysis.figures import before_after_grid, reward_vs_time_figure
from rlcm_exp.analysis.runs import read_evals
from rlcm_exp.tracking import read_metrics

if TYPE_CHECKING:
    import torch


def write_summary(
    run_dir: Path, before: torch.Tensor | None = None, after: torch.Tensor | None = None
) -> str:
    """Writes reward_vs_time.png (training reward and held-out reward against wall-clock seconds) and,
    given held-out images from the first and last evaluation (same prompts and seeds), before_after.png.
    Returns the line it prints: reward before -> after."""
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = read_evals(run_dir)
    reward_vs_time_figure(records, evals, run_dir / "reward_vs_time.png")
    if before is not None and after is not None:
        before_after_grid(before, after, run_dir / "before_after.png")
    return summary_line(records, evals)


def summary_line(records: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> str:
    """Training-round mean reward first -> last; with two evaluations or more, the held-out reward and
    each of its parts (eval_reward/<part>, e.g. the detector's colour / shape / background) too."""
    line = (
        f"reward (training round mean): {records[0]['reward_mean']:.4f} -> {records[-1]['reward_mean']:.4f}"
    )
    if len(evals) >= 2:
        line += f"; held-out: {evals[0]['eval_reward_mean']:.4f} -> {evals[-1]['eval_reward_mean']:.4f}"
        parts = [k for k in evals[0] if k.startswith("eval_reward/") and k in evals[-1]]
        line += "".join(
            f", {k[len('eval_reward/') :]} {evals[0][k]:.3f} -> {evals[-1][k]:.3f}" for k in parts
        )
    return line

"""End-of-run summary from the run dir: reward vs wall-clock plot, before/after grid, one printed line."""

from __future__ import annotations

from pathlib import Path

import torch

from rlcm_exp.tracking import read_metrics


def write_summary(
    run_dir: Path, before: torch.Tensor | None = None, after: torch.Tensor | None = None
) -> str:
    """Writes reward_vs_time.png (training reward and held-out reward against wall-clock seconds) and,
    given held-out images from the first and last evaluation (same prompts and seeds), before_after.png.
    Returns the line it prints: reward before -> after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    evals = read_metrics(run_dir / "eval.jsonl") if (run_dir / "eval.jsonl").is_file() else []
    fig, ax = plt.subplots(figsize=(6, 4))
    t = [r["wallclock_s"] for r in records]
    mean = torch.tensor([r["reward_mean"] for r in records])
    std = torch.tensor([r["reward_std"] for r in records])
    ax.plot(t, mean, label="training reward (mean of the round)")
    ax.fill_between(t, mean - std, mean + std, alpha=0.2)
    if evals:
        ax.plot(
            [e["wallclock_s"] for e in evals],
            [e["eval_reward_mean"] for e in evals],
            "o-",
            label="held-out prompts, fixed seeds",
        )
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("reward")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "reward_vs_time.png", dpi=120)
    plt.close(fig)
    if before is not None and after is not None:
        from torchvision.utils import save_image

        k = min(len(before), len(after), 8)
        save_image(torch.cat([before[:k], after[:k]]), run_dir / "before_after.png", nrow=k, padding=2)
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

"""Every figure the project draws, from run folders and evaluation results (PNG, 120 dpi).

- reward_vs_time_figure, before_after_grid: one run's summary (end of `python -m rlcm_exp`)
- compare_figure: every run of a sweep (`python -m rlcm_exp.compare`)
- training_figure, inference_figure: reward curves per task and group, and reward against inference
  seconds (the reproduction draws the paper's Figs. 4, 5, 7 and 6 with them)

Which algorithms exist is not known here: a figure takes each algorithm's colour from its caller
(rlcm_exp.reproduction reads them from the scale file), else matplotlib's default cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlcm_exp.analysis.runs import Run, find_runs, group_runs, run_labels, seed_mean_curve

AXIS_LABELS = {
    "reward_queries": "reward queries",
    "gpu_hours": "GPU-hours (device-hours on CPU)",
    "wallclock_s": "training wall-clock (s)",
    "epoch": "epoch",
    "reward_mean": "reward (mean over the epoch's samples)",
}
COMPARE_AXES = ("gpu_hours", "reward_queries")  # the compare figure's two panels, left to right
DPI = 120


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display on a cluster node); imported on use,
    as a training run that never draws should not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    plt = _pyplot()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- one run


def reward_vs_time_figure(
    records: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], out: Path, title: str = ""
) -> Path:
    """Training reward (mean +- std of each round) and held-out reward against wall-clock seconds;
    `title`: the run's name (`runs.run_title`)."""
    import torch  # on use: `python -m rlcm_exp.compare` draws without loading torch

    plt = _pyplot()
    monitors = any(k in r for r in records for k in MONITORS) or any(
        "eval_gold_reward_mean" in e for e in evals
    )
    fig, axes = plt.subplots(2 if monitors else 1, 1, figsize=(6, 7 if monitors else 4), squeeze=False)
    ax = axes[0, 0]
    if monitors:
        _monitor_panel(axes[1, 0], records, evals)
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
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


MONITORS = ("diversity", "kl_to_base")  # over-optimisation monitors of metrics.jsonl (issue 21)


def _monitor_panel(ax: Any, records: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> None:
    """Over-optimisation monitors against wall-clock: the round's within-prompt diversity (left axis),
    the KL to the base model (right axis, log) and the held-out gold reward (its own axis)."""
    lines = []
    div = [(r["wallclock_s"], r["diversity"]) for r in records if "diversity" in r]
    if div:
        lines += ax.plot(*zip(*div, strict=True), color="tab:purple", label="diversity (same-prompt images)")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("diversity")
    kl = [(r["wallclock_s"], r["kl_to_base"]) for r in records if r.get("kl_to_base", 0) > 0]
    if kl:
        right = ax.twinx()
        lines += right.plot(*zip(*kl, strict=True), color="tab:red", label="KL to the base model")
        right.set_yscale("log")
        right.set_ylabel("kl_to_base")
    gold = [(e["wallclock_s"], e["eval_gold_reward_mean"]) for e in evals if "eval_gold_reward_mean" in e]
    if gold:
        third = ax.twinx()
        third.spines["right"].set_position(("axes", 1.18))
        lines += third.plot(*zip(*gold, strict=True), "s--", color="tab:olive", label="held-out gold reward")
        third.set_ylabel("gold reward")
    if lines:
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7)
    ax.grid(alpha=0.3)


GRID_MIN_PX = 128  # an image of before_after.png is upscaled (nearest neighbour) to at least this
GRID_MAX_PX = 256  # and a larger one drawn at most this big


def before_after_grid(snaps: Sequence[dict[str, Any]], out: Path, title: str = "") -> Path:
    """One row per evaluation snapshot (`analysis.summary.select_eval_images`: before on top, after
    below; same prompts and seeds), each image labelled with its prompt (column), the row's epochs
    done and held-out mean, and the prompt's mean reward over the evaluation's seeds."""
    import textwrap

    plt = _pyplot()
    k = min(len(s["images"]) for s in snaps)
    height = int(snaps[0]["images"].shape[-2])
    factor = max(1, -(-GRID_MIN_PX // height))  # integer upscale: every source pixel becomes a block
    px = min(height * factor, GRID_MAX_PX)
    size = px / DPI
    fig, axes = plt.subplots(
        len(snaps), k, figsize=(k * (size + 0.15) + 0.5, len(snaps) * (size + 0.75) + 0.4), squeeze=False
    )
    for row, (snap, ax_row) in enumerate(zip(snaps, axes, strict=True)):
        label = "before" if row == 0 and len(snaps) > 1 else "after" if len(snaps) > 1 else "held-out"
        for col, ax in enumerate(ax_row):
            img = snap["images"][col].float().clamp(0, 1).permute(1, 2, 0).numpy()
            img = np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)
            ax.imshow(img, interpolation="nearest" if px >= img.shape[0] else "antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(textwrap.fill(snap["prompts"][col], 22), fontsize=7)
            ax.set_xlabel(f"seed {snap['seeds'][col]}: r {snap['rewards'][col]:.4g}", fontsize=7)
        ax_row[0].set_ylabel(
            f"{label}\n(epoch {snap['epochs_done']})\nheld-out {snap['eval_reward_mean']:.4g}", fontsize=8
        )
    fig.suptitle(
        f"{title}\nr: the prompt's mean reward over the evaluation's seeds", fontsize=8 if title else 7
    )
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- a sweep


def compare_figure(sweep_dir: Path, out: Path | None = None, metric: str = "reward_mean") -> Path:
    """Every run under `sweep_dir` in one PNG (default SWEEP_DIR/compare.png), one line per run, named
    by the config values that differ; `metric` against GPU-hours and against reward queries."""
    plt = _pyplot()
    sweep_dir = Path(sweep_dir)
    runs = [r for r in find_runs(sweep_dir) if r.records]
    if not runs:
        raise FileNotFoundError(
            f"no run folders (metrics.jsonl + config.yaml with at least one epoch) under {sweep_dir}"
        )
    labels = run_labels(runs)
    fig, axes = plt.subplots(1, len(COMPARE_AXES), figsize=(6 * len(COMPARE_AXES), 4.5 + 0.2 * len(runs)))
    for ax, x_key in zip(axes, COMPARE_AXES, strict=True):
        for run, label in zip(runs, labels, strict=True):
            xs = [rec[x_key] for rec in run.records]
            ys = [rec.get(metric, float("nan")) for rec in run.records]
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(AXIS_LABELS.get(x_key, x_key))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    # one legend under both panels: labels can be long
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=1 if len(runs) > 6 else 2, fontsize=7)
    fig.suptitle(f"{sweep_dir} ({len(runs)} runs): {metric}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(runs) + 1) // 2 if len(runs) <= 6 else len(runs)), 1, 1))
    return _save(fig, Path(out) if out else sweep_dir / "compare.png")


# ----------------------------------------------------------------------------- reward curves by group


def _label(run: Run) -> str:
    return f"{run.algo.upper()} (H={run.num_steps})"


def plot_groups(
    ax: Any, groups: dict[tuple[str, str, int], list[Run]], x_key: str, y_key: str = "reward_mean"
) -> None:
    """One line per group: the seed mean, with a +- std band over seeds."""
    for _, members in sorted(groups.items()):
        c = seed_mean_curve(members, x_key, y_key)
        (line,) = ax.plot(
            c.x, c.y, marker="o", markersize=3, label=f"{_label(members[0])}, {c.seeds} seed(s)"
        )
        if c.seeds > 1:
            ax.fill_between(c.x, c.y - c.y_std, c.y + c.y_std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(AXIS_LABELS.get(x_key, x_key))
    ax.set_ylabel(AXIS_LABELS.get(y_key, y_key))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def training_figure(
    runs: Sequence[Run], x_key: str, out: Path, title: str, tasks: Sequence[str] | None = None
) -> Path:
    """Figs. 4, 5 and 7: one panel per task, reward against `x_key` for every group of that task."""
    plt = _pyplot()
    groups = group_runs(runs)
    task_names = list(tasks) if tasks else sorted({t for t, _, _ in groups})
    fig, axes = plt.subplots(1, len(task_names), figsize=(5 * len(task_names), 4), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        plot_groups(ax, {g: m for g, m in groups.items() if g[0] == task}, x_key)
        ax.set_title(task)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def inference_figure(
    results: Sequence[dict[str, Any]], out: Path, title: str, colors: Mapping[str, str | None] | None = None
) -> Path:
    """Reward against inference seconds per image (the paper's Fig. 6), every algorithm on one axis per
    task, each in `colors[algo]` (absent or None: matplotlib's next colour).

    Solid: the time-budget protocol (x = the budget). Dashed: full rollouts at each step count
    (x = measured seconds per image)."""
    plt = _pyplot()
    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for algo in sorted({r["algo"] for r in results if r["task"] == task}):
            mine = [r for r in results if r["task"] == task and r["algo"] == algo]
            _plot_inference(ax, algo, mine, (colors or {}).get(algo))
        _inference_axes(ax, task)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _plot_inference(ax: Any, algo: str, mine: Sequence[dict[str, Any]], color: str | None) -> None:
    """One algorithm's lines of a Fig. 6 panel, over the checkpoints `mine` evaluated."""
    budget = _mean_rows([r["budgets"] for r in mine], None, x_key="budget_s")
    if budget:
        x, y, s = zip(*budget, strict=True)
        ax.plot(x, y, marker="o", color=color, label=f"{algo.upper()} time budget ({len(mine)} ckpt)")
        ax.fill_between(x, np.subtract(y, s), np.add(y, s), color=color, alpha=0.15)
    steps = _mean_rows([r["steps"] for r in mine], "num_steps", x_key="seconds_per_image")
    if steps:
        x, y, _ = zip(*steps, strict=True)
        ax.plot(
            x,
            y,
            linestyle="--",
            marker="s",
            color=color,
            alpha=0.7,
            label=f"{algo.upper()} full rollouts by step count",
        )


def _inference_axes(ax: Any, task: str) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("inference seconds per image (this device)")
    ax.set_ylabel("reward (held-out prompts)")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _mean_rows(
    tables: Sequence[Sequence[dict[str, Any]]], key: str | None, x_key: str
) -> list[tuple[float, float, float]]:
    """Rows of several checkpoints, matched by `key` (None: by position, for budgets chosen relative to
    each checkpoint's own timing): (mean x, mean reward, std of the per-checkpoint means when several,
    else the std over trajectories)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for table in tables:
        for i, row in enumerate(table):
            groups.setdefault(i if key is None else row[key], []).append(row)
    out = []
    for rows in groups.values():
        means = [row["reward_mean"] for row in rows]
        spread = float(np.std(means)) if len(rows) > 1 else float(rows[0]["reward_std"])
        out.append((float(np.mean([row[x_key] for row in rows])), float(np.mean(means)), spread))
    return sorted(out)

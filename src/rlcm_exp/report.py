"""Figures and tables from local run folders (metrics.jsonl + config.yaml): no wandb needed.

A run folder is any folder holding both files. Runs that differ only in their seed form a group;
a group's curve is the seed mean (and std) of a metric at each epoch, plotted against the seed
mean of a time axis (reward queries, GPU-hours, wall-clock) at that epoch.

Time-to-threshold: the first point of a group's seed-mean curve at which the mean reward reaches
the threshold (>=: every reward here is higher-is-better). The default threshold of a task is the
lower of the algorithms' final seed-mean rewards, so that every algorithm reaches it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.tracking import read_metrics


@dataclass
class Run:
    path: Path
    algo: str  # cfg.algo.name
    task: str  # cfg.task.name
    seed: int  # cfg.seed
    num_steps: int  # cfg.sampler.num_steps (H)
    epochs: int  # cfg.train.epochs (planned)
    records: list[dict[str, Any]]  # metrics.jsonl, one per finished epoch
    flat_config: dict[str, Any] = field(default_factory=dict)  # config.yaml as {"a.b.c": leaf}

    @property
    def group(self) -> tuple[str, str, int]:
        """What a seed-mean averages over: same task, algorithm and horizon."""
        return (self.task, self.algo, self.num_steps)

    @property
    def finished(self) -> bool:
        return len(self.records) >= self.epochs and (self.path / "checkpoints" / "final").is_dir()


def load_run(path: Path) -> Run:
    cfg = OmegaConf.load(path / "config.yaml")
    assert isinstance(cfg, DictConfig)
    return Run(
        path=path,
        algo=str(OmegaConf.select(cfg, "algo.name", default="?")),
        task=str(OmegaConf.select(cfg, "task.name", default="?")),
        seed=int(OmegaConf.select(cfg, "seed", default=0)),
        num_steps=int(OmegaConf.select(cfg, "sampler.num_steps", default=0)),
        epochs=int(OmegaConf.select(cfg, "train.epochs", default=0)),
        records=read_metrics(path / "metrics.jsonl"),
        flat_config=flatten(OmegaConf.to_container(cfg, resolve=False)),
    )


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def find_runs(root: Path) -> list[Run]:
    """Every folder under `root` (itself included) with metrics.jsonl and config.yaml, sorted by path."""
    folders = {p.parent for p in Path(root).rglob("metrics.jsonl") if (p.parent / "config.yaml").is_file()}
    return [load_run(p) for p in sorted(folders)]


@dataclass
class Curve:
    x: np.ndarray  # seed mean of the x-axis at each epoch
    y: np.ndarray  # seed mean of the metric at each epoch
    y_std: np.ndarray  # std over seeds (0 with one seed)
    seeds: int  # runs averaged

    def final(self) -> float:
        return float(self.y[-1])


def seed_mean_curve(runs: Sequence[Run], x_key: str, y_key: str = "reward_mean") -> Curve:
    """Seed mean/std of `y_key` against the seed mean of `x_key`, epoch by epoch, over the epochs every
    run has finished."""
    n = min(len(r.records) for r in runs)
    if n == 0:
        raise ValueError(f"no finished epoch in {[str(r.path) for r in runs]}")
    xs = np.array([[rec[x_key] for rec in r.records[:n]] for r in runs], dtype=np.float64)
    ys = np.array([[rec[y_key] for rec in r.records[:n]] for r in runs], dtype=np.float64)
    return Curve(x=xs.mean(0), y=ys.mean(0), y_std=ys.std(0), seeds=len(runs))


def time_to_threshold(curve: Curve, threshold: float) -> float | None:
    """x at the first point where the seed-mean y reaches `threshold`; None if it never does."""
    hits = np.nonzero(curve.y >= threshold)[0]
    return float(curve.x[hits[0]]) if len(hits) else None


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str, int], list[Run]]:
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return groups


# ----------------------------------------------------------------------------- the comparison table

# What the paper states (sec. 6): training-time speed-up on aesthetic, and rollout time.
PAPER_TRAINING_SPEEDUP = {"aesthetic": "17x (GPU-hours)"}
PAPER_ROLLOUT_RATIO = "~4x (a full RLCM rollout takes about a quarter of a DDPO rollout)"


def threshold_table(
    runs: Sequence[Run],
    main_steps: dict[tuple[str, str], int] | None = None,
    thresholds: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, algorithm): final seed-mean reward, threshold, time to reach it in wall-clock
    seconds and GPU-hours, and the speed-up DDPO time / RLCM time on the RLCM row.

    `main_steps[(task, algo)]` picks the horizon of the main comparison when a task also has horizon
    ablation runs (default: the group with the most runs, then the largest H)."""
    groups = group_runs(runs)
    chosen: dict[tuple[str, str], list[Run]] = {}
    for (task, algo, steps), members in sorted(groups.items()):
        want = (main_steps or {}).get((task, algo))
        if want is not None and steps != want:
            continue
        best = chosen.get((task, algo))
        if best is None or (want is None and (len(members), steps) > (len(best), best[0].num_steps)):
            chosen[(task, algo)] = members
    rows = []
    for task in sorted({t for t, _ in chosen}):
        algos = sorted(a for t, a in chosen if t == task)
        curves = {
            a: (
                seed_mean_curve(chosen[(task, a)], "wallclock_s"),
                seed_mean_curve(chosen[(task, a)], "gpu_hours"),
            )
            for a in algos
        }
        finals = {a: curves[a][0].final() for a in algos}
        given = (thresholds or {}).get(task)
        threshold = float(given) if given is not None else min(finals.values())
        source = "configured" if given is not None else "lower final seed-mean reward"
        task_rows: list[dict[str, Any]] = []
        for a in algos:
            wall, gpu = curves[a]
            task_rows.append(
                {
                    "task": task,
                    "algo": a,
                    "num_steps": chosen[(task, a)][0].num_steps,
                    "seeds": wall.seeds,
                    "epochs": len(wall.y),
                    "final_reward": finals[a],
                    "final_reward_std": float(wall.y_std[-1]),
                    "threshold": threshold,
                    "threshold_source": source,
                    "time_to_threshold_s": time_to_threshold(wall, threshold),
                    "gpu_hours_to_threshold": time_to_threshold(gpu, threshold),
                }
            )
        by_algo = {r["algo"]: r for r in task_rows}
        if "rlcm" in by_algo and "ddpo" in by_algo:
            r, d = by_algo["rlcm"], by_algo["ddpo"]
            r["speedup_gpu_hours"] = _ratio(d["gpu_hours_to_threshold"], r["gpu_hours_to_threshold"])
            r["speedup_wallclock"] = _ratio(d["time_to_threshold_s"], r["time_to_threshold_s"])
            if d["time_to_threshold_s"] is None:  # DDPO never got there: its whole budget bounds the speed-up
                wall, gpu = curves["ddpo"]
                r["speedup_gpu_hours_min"] = _ratio(float(gpu.x[-1]), r["gpu_hours_to_threshold"])
                r["speedup_wallclock_min"] = _ratio(float(wall.x[-1]), r["time_to_threshold_s"])
            r["paper"] = PAPER_TRAINING_SPEEDUP.get(task, "not stated as a number")
        rows += task_rows
    return rows


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def fmt(value: Any) -> str:
    """Table cells: 6 significant digits (tests re-read them), '-' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _speedup(row: dict[str, Any], key: str) -> str:
    """The ratio, or "> bound" when DDPO did not reach the threshold within its budget."""
    if row.get(key) is None and row.get(f"{key}_min") is not None:
        return f"> {fmt(row[f'{key}_min'])}"
    return fmt(row.get(key))


def markdown_table(columns: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    """A GitHub table; non-string cells go through `fmt`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def threshold_markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        *("task", "algo", "H", "seeds", "epochs", "final reward (mean +- std)", "threshold"),
        *("time to threshold (s)", "GPU-hours to threshold"),
        *("speed-up DDPO/RLCM (GPU-h)", "speed-up DDPO/RLCM (wall-clock)", "paper"),
    ]
    cells = [
        [
            *(r["task"], r["algo"], r["num_steps"], r["seeds"], r["epochs"]),
            f"{fmt(r['final_reward'])} +- {fmt(r['final_reward_std'])}",
            *(r["threshold"], r["time_to_threshold_s"], r["gpu_hours_to_threshold"]),
            *(_speedup(r, "speedup_gpu_hours"), _speedup(r, "speedup_wallclock"), r.get("paper", "")),
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)


PHASES = ("time_sample_s", "time_reward_s", "time_train_s")  # the metrics.jsonl keys of one epoch's phases


def phase_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Seconds per epoch by phase, one row per (task, algorithm, H): the mean over every epoch of every
    seed of sampling, reward (scoring time, which may overlap sampling), training, and the epoch's
    wall-clock (`wallclock_s` increments: all phases plus gathering and bookkeeping). The RLCM row of a
    task gets DDPO's wall-clock per trajectory / RLCM's (`ddpo_over_rlcm`; per trajectory because the
    two may sample different batches per epoch) when the task has exactly one DDPO group."""
    rows: list[dict[str, Any]] = []
    for (task, algo, steps), group in sorted(group_runs(runs).items()):
        per_epoch = {k: [rec[k] for r in group for rec in r.records if k in rec] for k in PHASES}
        # wallclock_s is cumulative per run: an epoch's wall-clock is its increment
        walls = [
            float(d) for r in group for d in np.diff([rec["wallclock_s"] for rec in r.records], prepend=0.0)
        ]
        rows.append(
            {
                "task": task,
                "algo": algo,
                "num_steps": steps,
                "epochs": len(walls),
                "samples_per_epoch": group[0].flat_config.get("train.samples_per_epoch"),
                **{k: float(np.mean(v)) if v else None for k, v in per_epoch.items()},
                "epoch_s": float(np.mean(walls)) if walls else None,
            }
        )
    for task in {r["task"] for r in rows}:
        ddpo = [r for r in rows if r["task"] == task and r["algo"] == "ddpo"]
        if len(ddpo) == 1:
            for r in rows:
                if r["task"] == task and r["algo"] == "rlcm":
                    r["ddpo_over_rlcm"] = _ratio(_per_trajectory(ddpo[0]), _per_trajectory(r))
    return rows


def _per_trajectory(row: dict[str, Any]) -> float | None:
    """An epoch's wall-clock per sampled trajectory."""
    if row["epoch_s"] is None or not row["samples_per_epoch"]:
        return None
    return row["epoch_s"] / row["samples_per_epoch"]


def phase_markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        *("task", "algo", "H", "epochs (all seeds)", "samples/epoch", "sampling (s)", "reward (s)"),
        *("training (s)", "epoch wall-clock (s)", "DDPO/RLCM time per trajectory"),
    ]
    cells = [
        [
            *(r["task"], r["algo"], r["num_steps"], r["epochs"], r["samples_per_epoch"]),
            *(
                r["time_sample_s"],
                r["time_reward_s"],
                r["time_train_s"],
                r["epoch_s"],
                r.get("ddpo_over_rlcm"),
            ),
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)


# ----------------------------------------------------------------------------- figures


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


ALGO_COLORS = {"rlcm": "tab:green", "ddpo": "tab:blue"}  # the same colour for an algorithm in every figure
AXIS_LABELS = {
    "reward_queries": "reward queries",
    "gpu_hours": "GPU-hours (device-hours on CPU)",
    "wallclock_s": "training wall-clock (s)",
    "epoch": "epoch",
    "reward_mean": "reward (mean over the epoch's samples)",
}


def training_figure(
    runs: Sequence[Run], x_key: str, out: Path, title: str, tasks: Sequence[str] | None = None
) -> Path:
    """One panel per task: reward against `x_key` for every group of that task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    task_names = list(tasks) if tasks else sorted({t for t, _, _ in groups})
    fig, axes = plt.subplots(1, len(task_names), figsize=(5 * len(task_names), 4), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        plot_groups(ax, {g: m for g, m in groups.items() if g[0] == task}, x_key)
        ax.set_title(task)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def inference_figure(results: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """Fig. 6: reward against inference seconds per image, both algorithms on one axis per task.

    Solid: the time-budget protocol (x = the budget). Dashed: full rollouts at each step count
    (x = measured seconds per image)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for algo in sorted({r["algo"] for r in results if r["task"] == task}):
            color = ALGO_COLORS.get(algo)
            mine = [r for r in results if r["task"] == task and r["algo"] == algo]
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
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("inference seconds per image (this device)")
        ax.set_ylabel("reward (held-out prompts)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


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


def rollout_table(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per image of a full rollout at each checkpoint's own H, mean over checkpoints, with DDPO/RLCM."""
    rows = []
    for task in sorted({r["task"] for r in results}):
        per_algo = {}
        for algo in sorted({r["algo"] for r in results if r["task"] == task}):
            own = [
                s
                for r in results
                if r["task"] == task and r["algo"] == algo
                for s in r["steps"]
                if s["num_steps"] == r["num_steps"]
            ]
            if own:
                per_algo[algo] = (own[0]["num_steps"], float(np.mean([s["seconds_per_image"] for s in own])))
        for algo, (steps, sec) in per_algo.items():
            row: dict[str, Any] = {"task": task, "algo": algo, "num_steps": steps, "seconds_per_image": sec}
            if algo == "rlcm" and "ddpo" in per_algo:
                row["ddpo_over_rlcm"] = _ratio(per_algo["ddpo"][1], sec)
                row["paper"] = PAPER_ROLLOUT_RATIO
            rows.append(row)
    return rows


def rollout_markdown(rows: Sequence[dict[str, Any]]) -> str:
    columns = ["task", "algo", "H", "s/image (full rollout)", "DDPO / RLCM", "paper"]
    cells = [
        [
            r["task"],
            r["algo"],
            r["num_steps"],
            r["seconds_per_image"],
            r.get("ddpo_over_rlcm"),
            r.get("paper", ""),
        ]
        for r in rows
    ]
    return markdown_table(columns, cells)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))

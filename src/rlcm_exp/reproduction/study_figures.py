"""The study's figures (95% bootstrap bands over seeds) and the numbers read off saved sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlcm_exp.analysis.figures import AXIS_LABELS, _pyplot, _save
from rlcm_exp.reproduction.study import PAPER, Study, chosen_setting, final_name
from rlcm_exp.reproduction.study_stats import (
    Group,
    Interval,
    curve_band,
    image_stats,
    per_seed_interval,
)

LINESTYLE = {"tuned": "-", PAPER: "--"}
STATS = ("diversity", "fidelity", "luminance", "saturation", "foreground", "texture")
UPSCALE = 4  # sample grids: a 32 px image drawn at 128 px


def _band(ax: Any, g: Group, axis: str, label: str, color: str | None, style: str = "-") -> None:
    x, y, lo, hi = curve_band(g, axis)
    ax.plot(x, y, linestyle=style, color=color, label=f"{label} ({g.n} seeds)")
    ax.fill_between(x, lo, hi, color=color, alpha=0.15)


def training_bands(
    groups: dict[tuple[str, str, str], Group],
    axis: str,
    out: Path,
    tasks: Sequence[str],
    thresholds: dict[str, float],
    colors: dict[str, str | None],
) -> Path:
    """Figs. 4 and 5: a panel per task, each algorithm's tuned (solid) and paper (dashed) settings, in
    its colour (`colors`: the study file's)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for (t, algo, variant), g in sorted(groups.items()):
            if t == task:
                _band(ax, g, axis, f"{algo.upper()} {variant}", colors.get(algo), LINESTYLE[variant])
        if task in thresholds:
            ax.axhline(thresholds[task], color="grey", linestyle=":", linewidth=1, label="threshold")
        ax.set(title=task, xlabel=AXIS_LABELS[axis], ylabel="reward (round mean)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def horizon_bands(
    study: Study, horizon: dict[int, Group], baseline: Group | None, out: Path, threshold: float
) -> Path:
    """Fig. 7: the method at each H against GPU-hours, the baseline's chosen setting for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    shades = plt.get_cmap("Greens")(np.linspace(0.45, 0.95, max(len(horizon), 1)))
    for color, (h, g) in zip(shades, sorted(horizon.items()), strict=False):
        _band(ax, g, "gpu_hours", f"{study.method.upper()} H={h}", color)
    if baseline is not None:
        _band(ax, baseline, "gpu_hours", f"{study.baseline.upper()} tuned", study.colors.get(study.baseline))
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label="threshold")
    ax.set(
        title=f"horizon ablation, {study.horizon_task}",
        xlabel=AXIS_LABELS["gpu_hours"],
        ylabel="reward (round mean)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def fig6_rows(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, algo, step count): seconds per image and held-out reward over the seeds' checkpoints."""
    rows = []
    for task, algo in sorted({(e["task"], e["algo"]) for e in evals}):
        mine = [e for e in evals if e["task"] == task and e["algo"] == algo]
        for steps in sorted({r["num_steps"] for e in mine for r in e["steps"]}):
            got = [r for e in mine for r in e["steps"] if r["num_steps"] == steps]
            rows.append(
                {
                    "task": task,
                    "algo": algo,
                    "num_steps": steps,
                    "checkpoints": len(got),
                    "seconds_per_image": per_seed_interval([r["seconds_per_image"] for r in got]),
                    "reward": per_seed_interval([r["reward_mean"] for r in got]),
                }
            )
    return rows


def inference_bands(evals: list[dict[str, Any]], out: Path, colors: dict[str, str | None]) -> Path:
    """Fig. 6: budget curves (solid, matched by position) and full rollouts (dashed), 95% bands over checkpoints."""
    plt = _pyplot()
    tasks = sorted({e["task"] for e in evals})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for algo in sorted({e["algo"] for e in evals if e["task"] == task}):
            mine = [e for e in evals if e["task"] == task and e["algo"] == algo]
            color = colors.get(algo)
            for key, rows_of, style in (
                ("budget_s", lambda e: e["budgets"], "-"),
                ("seconds_per_image", lambda e: e["steps"], "--"),
            ):
                tables = [rows_of(e) for e in mine if rows_of(e)]
                if not tables:
                    continue
                n = min(len(t) for t in tables)
                x = [float(np.mean([t[i][key] for t in tables])) for i in range(n)]
                cis = [per_seed_interval([t[i]["reward_mean"] for t in tables]) for i in range(n)]
                label = f"{algo.upper()} {'time budget' if style == '-' else 'full rollouts'} ({len(tables)} ckpt)"
                ax.plot(x, [c.value for c in cis], style, marker="o", color=color, label=label)
                ax.fill_between(x, [c.lo for c in cis], [c.hi for c in cis], color=color, alpha=0.12)
        ax.set(
            title=task,
            xscale="log",
            xlabel="inference seconds per image (this CPU)",
            ylabel="held-out reward",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


# ---------------------------------------------------------------------------- sample grids


def _grid_files(run_dir: Path) -> tuple[Path, Path] | None:
    pngs = sorted((run_dir / "samples").glob("epoch_*.png"))
    return (pngs[0], pngs[-1]) if len(pngs) >= 2 else None


def _read_grid(png: Path) -> tuple[np.ndarray, list[str]]:
    from PIL import Image

    captions = [line.rsplit(" | ", 1)[0] for line in png.with_suffix(".txt").read_text().splitlines() if line]
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255.0, captions


def image_rows(
    folder: Path, study: Any, selection: dict[str, Any], groups: dict[tuple[str, str, str], Group]
) -> list[dict[str, Any]]:
    """Per (task, algo, variant): each image statistic before and after, and its change, over seeds."""
    from rlcm_exp.toy.reward import toy_detector

    detector = toy_detector()
    rows = []
    for (task, algo, variant), g in sorted(groups.items()):
        per_seed: dict[str, list[tuple[float, float]]] = {k: [] for k in STATS}
        for run in g.runs:
            files = _grid_files(run.path)
            if files is None:
                continue
            first, last = (image_stats(*_read_grid(p), detector) for p in files)
            for k in STATS:
                per_seed[k].append((first[k], last[k]))
        if not per_seed["diversity"]:
            continue
        row: dict[str, Any] = {
            "task": task,
            "algo": algo,
            "variant": variant,
            "seeds": len(per_seed["diversity"]),
        }
        for k, pairs in per_seed.items():
            row[f"{k}_before"] = per_seed_interval([a for a, _ in pairs])
            row[f"{k}_after"] = per_seed_interval([b for _, b in pairs])
            row[f"{k}_change"] = per_seed_interval([b - a for a, b in pairs])
        rows.append(row)
    return rows


WORDS = {  # statistic: (how the images were after training when it rose, when it fell)
    "luminance": ("brighter", "darker"),
    "saturation": ("more saturated", "paler"),
    "foreground": (
        "with larger shapes (more pixels unlike the background)",
        "with smaller or fainter shapes",
    ),
    "texture": ("with more contrast within each image", "flatter (less contrast within each image)"),
    "diversity": ("more varied", "less varied"),
    "fidelity": ("closer to their captions", "less faithful to their captions"),
}


def describe_change(row: dict[str, Any]) -> str:
    """In words, the changes whose 95% interval excludes 0, then every statistic's numbers."""
    said = [
        WORDS[k][0] if row[f"{k}_change"].lo > 0 else WORDS[k][1]
        for k in STATS
        if row[f"{k}_change"].lo > 0 or row[f"{k}_change"].hi < 0
    ]
    words = (
        ("after training its images were " + ", ".join(said))
        if said
        else "no change whose interval excludes 0"
    )
    numbers = "; ".join(
        f"{k} {_pair(row[f'{k}_before'], row[f'{k}_after'])} (change {row[f'{k}_change'].text(2)})"
        for k in STATS
    )
    return f"{words}. {numbers}."


def _pair(a: Interval, b: Interval) -> str:
    return f"{a.value:.3g} -> {b.value:.3g}"


def sample_grid(
    folder: Path, study: Study, task: str, selection: dict[str, Any], seed: int, out: Path
) -> Path | None:
    """Before (first round) and after (last round) images of every algorithm's chosen setting at `seed`,
    16 of each, upscaled UPSCALE x with nearest-neighbour so that a 32 px image is visible."""
    from rlcm_exp.reproduction.study_stats import split_grid

    panels = []
    for algo in study.algos:
        files = _grid_files(
            folder / "runs" / final_name(task, algo, chosen_setting(selection, task, algo), seed)
        )
        if files is None:
            continue
        for when, png in zip(("first round", "last round"), files, strict=True):
            grid, captions = _read_grid(png)
            images = split_grid(grid, len(captions))[:16]
            row = np.concatenate(list(images), axis=1).repeat(UPSCALE, 0).repeat(UPSCALE, 1)
            panels.append((f"{algo.upper()} {when}", row))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(16, 1.25 * len(panels)), squeeze=False)
    for ax, (label, img) in zip(axes[:, 0], panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle(
        f"{task}, seed {seed}: the first 16 images of the first and of the last training round", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, out)

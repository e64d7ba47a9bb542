"""The comparison tables, as rows (dicts, also written to report.json) and as markdown.

Time-to-threshold: the first point of a group's seed-mean curve at which the mean reward reaches
the threshold (>=: every reward here is higher-is-better). The default threshold of a task is the
lower of the algorithms' final seed-mean rewards, so that every algorithm reaches it.

Ratios between two algorithms are drawn for the pair a caller names, `compare` = (method, baseline):
the baseline's time over the method's, on the method's row (the reproduction names the scale file's
pair; which algorithms exist is not known here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlcm_exp.analysis.runs import Run, group_runs, seed_mean_curve, time_to_threshold

Compare = tuple[str, str]  # (method, baseline): ratios are the baseline's over the method's


def ratio_label(compare: Compare | None, sep: str = "/") -> str:
    """The ratio in a column header: BASELINE/METHOD (baseline/method without a pair)."""
    if compare is None:
        return f"baseline{sep}method"
    return f"{compare[1].upper()}{sep}{compare[0].upper()}"


def over_key(compare: Compare | None) -> str:
    """The row key of the baseline-over-method time ratio, e.g. "ddpo_over_rlcm"."""
    method, baseline = compare or ("method", "baseline")
    return f"{baseline}_over_{method}"


def threshold_table(
    runs: Sequence[Run],
    main_steps: dict[tuple[str, str], int] | None = None,
    thresholds: dict[str, float] | None = None,
    compare: Compare | None = None,
    paper: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (task, algorithm): final seed-mean reward, threshold, time to reach it in wall-clock
    seconds and GPU-hours, and (with `compare`) the speed-up baseline time / method time on the method's
    row, next to `paper[task]` (what the paper states) when `paper` is given.

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
        if compare and set(compare) <= set(by_algo):
            r, d = by_algo[compare[0]], by_algo[compare[1]]
            r["speedup_gpu_hours"] = _ratio(d["gpu_hours_to_threshold"], r["gpu_hours_to_threshold"])
            r["speedup_wallclock"] = _ratio(d["time_to_threshold_s"], r["time_to_threshold_s"])
            if d["time_to_threshold_s"] is None:  # never got there: its whole budget bounds the speed-up
                wall, gpu = curves[compare[1]]
                r["speedup_gpu_hours_min"] = _ratio(float(gpu.x[-1]), r["gpu_hours_to_threshold"])
                r["speedup_wallclock_min"] = _ratio(float(wall.x[-1]), r["time_to_threshold_s"])
            if paper is not None:
                r["paper"] = paper.get(task, "not stated as a number")
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
    """The ratio, or "> bound" when the baseline did not reach the threshold within its budget."""
    if row.get(key) is None and row.get(f"{key}_min") is not None:
        return f"> {fmt(row[f'{key}_min'])}"
    return fmt(row.get(key))


def markdown_table(columns: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
    """A GitHub table; non-string cells go through `fmt`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


_WHO = (("task", "task"), ("algo", "algo"), ("H", "num_steps"))  # (header, row key): what a row is about


def keyed_markdown(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], optional: dict[str, Any] | None = None
) -> str:
    """A GitHub table of one row per dict; column (header, key) holds row[key]. Only the keys of
    `optional` may be missing from a row (their cell is then the default given there)."""
    optional = optional or {}
    cells = [[r.get(k, optional[k]) if k in optional else r[k] for _, k in columns] for r in rows]
    return markdown_table([header for header, _ in columns], cells)


def threshold_markdown(rows: Sequence[dict[str, Any]], compare: Compare | None = None) -> str:
    ratio = ratio_label(compare)
    columns = [
        *("task", "algo", "H", "seeds", "epochs", "final reward (mean +- std)", "threshold"),
        *("time to threshold (s)", "GPU-hours to threshold"),
        *(f"speed-up {ratio} (GPU-h)", f"speed-up {ratio} (wall-clock)", "paper"),
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


def phase_table(runs: Sequence[Run], compare: Compare | None = None) -> list[dict[str, Any]]:
    """Seconds per epoch by phase, one row per (task, algorithm, H): the mean over every epoch of every
    seed of sampling, reward (scoring time, which may overlap sampling), training, and the epoch's
    wall-clock (`wallclock_s` increments: all phases plus gathering and bookkeeping). With `compare`,
    the method's rows of a task get the baseline's wall-clock per trajectory / the method's
    (`over_key(compare)`; per trajectory because the two may sample different batches per epoch) when
    the task has exactly one baseline group."""
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
    if compare is None:
        return rows
    method, baseline = compare
    for task in {r["task"] for r in rows}:
        base = [r for r in rows if r["task"] == task and r["algo"] == baseline]
        if len(base) == 1:
            for r in rows:
                if r["task"] == task and r["algo"] == method:
                    r[over_key(compare)] = _ratio(_per_trajectory(base[0]), _per_trajectory(r))
    return rows


def _per_trajectory(row: dict[str, Any]) -> float | None:
    """An epoch's wall-clock per sampled trajectory."""
    if row["epoch_s"] is None or not row["samples_per_epoch"]:
        return None
    return row["epoch_s"] / row["samples_per_epoch"]


def phase_markdown(rows: Sequence[dict[str, Any]], compare: Compare | None = None) -> str:
    over = over_key(compare)
    columns = [
        *_WHO,
        *(("epochs (all seeds)", "epochs"), ("samples/epoch", "samples_per_epoch")),
        *(("sampling (s)", "time_sample_s"), ("reward (s)", "time_reward_s")),
        *(("training (s)", "time_train_s"), ("epoch wall-clock (s)", "epoch_s")),
        (f"{ratio_label(compare)} time per trajectory", over),
    ]
    return keyed_markdown(rows, columns, {over: None})


def rollout_table(
    results: Sequence[dict[str, Any]], compare: Compare | None = None, paper: str | None = None
) -> list[dict[str, Any]]:
    """Seconds per image of a full rollout at each checkpoint's own H, mean over checkpoints; with
    `compare`, the baseline's over the method's on the method's row (next to `paper`, when given)."""
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
            if compare and algo == compare[0] and compare[1] in per_algo:
                row[over_key(compare)] = _ratio(per_algo[compare[1]][1], sec)
                if paper is not None:
                    row["paper"] = paper
            rows.append(row)
    return rows


def rollout_markdown(rows: Sequence[dict[str, Any]], compare: Compare | None = None) -> str:
    over = over_key(compare)
    columns = [
        *_WHO,
        ("s/image (full rollout)", "seconds_per_image"),
        (ratio_label(compare, " / "), over),
        ("paper", "paper"),
    ]
    return keyed_markdown(rows, columns, {over: None, "paper": ""})

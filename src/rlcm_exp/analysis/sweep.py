"""The results table of a sweep (`python -m rlcm_exp.compare`): one row per run, one per group of
runs that differ only in their seed, as markdown and CSV next to the compare figure.

Per run: the metric's final and best value (and the epoch of the best), the held-out reward of the
first and of the last evaluation (eval.jsonl; "before" only when the first one ran before training),
the run's training wall-clock and reward queries, the wall-clock and reward queries at which the
metric first reached the threshold, and the config values that differ between the runs.

The threshold (higher is better, as every reward here): given, or by default the lowest final
seed-mean of the metric over the groups, so that every group's seed mean reaches it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlcm_exp.analysis.runs import Run, differing_keys, read_evals, seed_mean_curve, time_to_threshold
from rlcm_exp.analysis.tables import fmt, markdown_table
from rlcm_exp.errors import ConfigError
from rlcm_exp.tracking import diverged_at

THRESHOLD_RULE = "the lowest final seed-mean over the groups (runs that differ only in seed)"


def known_metrics(runs: Sequence[Run]) -> list[str]:
    """The numeric metrics.jsonl keys every run records at every epoch."""
    common: set[str] | None = None
    for run in runs:
        for rec in run.records:
            numeric = {k for k, v in rec.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            common = numeric if common is None else common & numeric
    return sorted(common or ())


def check_metric(runs: Sequence[Run], metric: str) -> None:
    known = known_metrics(runs)
    if metric not in known:
        raise ConfigError(f"--metric {metric!r} is not recorded by every run; known: {', '.join(known)}")


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs whose differing config values are the same but for the seed, in the runs' order."""
    keys = [k for k in differing_keys(runs, leaves=True) if k != "seed"]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(repr(run.flat_config.get(k)) for k in keys), []).append(run)
    return list(groups.values())


def default_threshold(runs: Sequence[Run], metric: str) -> float:
    return min(seed_mean_curve(g, "wallclock_s", metric).final() for g in seed_groups(runs))


def _first_reach(run: Run, metric: str, threshold: float, x_key: str) -> Any:
    return next((r[x_key] for r in run.records if r[metric] >= threshold), None)


def _heldout(run: Run) -> tuple[float | None, float | None]:
    """(before training, after the last evaluation) held-out mean reward; None where not evaluated."""
    evals = read_evals(run.path)
    before = next((e["eval_reward_mean"] for e in evals if e.get("epochs_done") == 0), None)
    return before, (evals[-1]["eval_reward_mean"] if evals else None)


def run_rows(runs: Sequence[Run], root: Path, metric: str, threshold: float) -> list[dict[str, Any]]:
    keys = differing_keys(runs, leaves=True)
    rows = []
    for run in runs:
        values = [float(r[metric]) for r in run.records]
        best = max(range(len(values)), key=lambda i: -math.inf if math.isnan(values[i]) else values[i])
        before, after = _heldout(run)
        rows.append(
            {
                "run": str(run.path.relative_to(root)) if run.path != root else run.path.name,
                **{k: run.flat_config.get(k) for k in keys},
                "epochs": len(values),
                "final": values[-1],
                "diverged_epoch": diverged_at(run.path),  # such a run's values are not results
                "best": values[best],
                "best_epoch": run.records[best].get("epoch", best),
                "heldout_before": before,
                "heldout_after": after,
                "wallclock_s": float(run.records[-1]["wallclock_s"]),
                "reward_queries": int(run.records[-1]["reward_queries"]),
                "threshold": threshold,
                "wallclock_s_to_threshold": _first_reach(run, metric, threshold, "wallclock_s"),
                "reward_queries_to_threshold": _first_reach(run, metric, threshold, "reward_queries"),
            }
        )
    return rows


def group_rows(runs: Sequence[Run], metric: str, threshold: float) -> list[dict[str, Any]]:
    """Seed means: the final value (+- std over seeds) and the seed-mean curve's first reach."""
    keys = [k for k in differing_keys(runs, leaves=True) if k != "seed"]
    rows = []
    for group in seed_groups(runs):
        wall = seed_mean_curve(group, "wallclock_s", metric)
        queries = seed_mean_curve(group, "reward_queries", metric)
        rows.append(
            {
                **{k: group[0].flat_config.get(k) for k in keys},
                "seeds": wall.seeds,
                "epochs": len(wall.y),
                "final_mean": wall.final(),
                "final_std": float(wall.y_std[-1]),
                "wallclock_s_to_threshold": time_to_threshold(wall, threshold),
                "reward_queries_to_threshold": time_to_threshold(queries, threshold),
            }
        )
    return rows


def write_sweep_tables(
    runs: Sequence[Run],
    root: Path,
    out_stem: Path,
    metric: str = "reward_mean",
    threshold: float | None = None,
) -> tuple[Path, Path]:
    """OUT_STEM.md (both tables, the threshold and its rule) and OUT_STEM.csv (the run rows)."""
    check_metric(runs, metric)
    source = "given (--threshold)" if threshold is not None else THRESHOLD_RULE
    threshold = float(threshold) if threshold is not None else default_threshold(runs, metric)
    rows = run_rows(runs, root, metric, threshold)
    groups = group_rows(runs, metric, threshold)
    csv_path, md_path = out_stem.with_suffix(".csv"), out_stem.with_suffix(".md")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    md_path.write_text(sweep_markdown(root, metric, threshold, source, rows, groups))
    return md_path, csv_path


def sweep_markdown(
    root: Path,
    metric: str,
    threshold: float,
    source: str,
    rows: Sequence[dict[str, Any]],
    groups: Sequence[dict[str, Any]],
) -> str:
    keys = [k for k in rows[0] if k not in RUN_COLUMNS]
    run_cols = ["run", *keys, "epochs", f"final {metric}", f"best {metric} (epoch)"]
    run_cols += ["held-out before", "held-out after", "wall-clock (s)", "reward queries"]
    run_cols += ["wall-clock to threshold (s)", "reward queries to threshold"]
    cells = [
        [
            *(r["run"], *(fmt(r[k]) for k in keys), r["epochs"], _final(r)),
            f"{fmt(r['best'])} ({r['best_epoch']})",
            *(r["heldout_before"], r["heldout_after"], r["wallclock_s"], r["reward_queries"]),
            *(r["wallclock_s_to_threshold"], r["reward_queries_to_threshold"]),
        ]
        for r in rows
    ]
    gkeys = [k for k in keys if k != "seed"]
    group_cols = [*gkeys, "seeds", "epochs", f"final {metric} (seed mean +- std)"]
    group_cols += ["wall-clock to threshold (s)", "reward queries to threshold"]
    group_cells = [
        [
            *(fmt(g[k]) for k in gkeys),
            *(g["seeds"], g["epochs"], f"{fmt(g['final_mean'])} +- {fmt(g['final_std'])}"),
            *(g["wallclock_s_to_threshold"], g["reward_queries_to_threshold"]),
        ]
        for g in groups
    ]
    return "\n".join(
        [
            f"# Sweep results: {root}",
            "",
            f"Metric `{metric}` (metrics.jsonl, higher is better). Threshold {fmt(threshold)}: {source}. "
            "To threshold: the training wall-clock and reward queries at the first epoch whose value "
            "reaches it ('-': never). Held-out: eval.jsonl's mean reward before training and at the last "
            "evaluation.",
            "",
            "## Runs",
            "",
            markdown_table(run_cols, cells),
            "## Groups (runs that differ only in seed)",
            "",
            markdown_table(group_cols, group_cells),
        ]
    )


def _final(row: dict[str, Any]) -> Any:
    if row["diverged_epoch"] is None:
        return row["final"]
    return f"DIVERGED at epoch {row['diverged_epoch']} (last finite: {fmt(row['final'])})"


RUN_COLUMNS = {
    "diverged_epoch",
    *("run", "epochs", "final", "best", "best_epoch", "heldout_before", "heldout_after"),
    *(
        "wallclock_s",
        "reward_queries",
        "threshold",
        "wallclock_s_to_threshold",
        "reward_queries_to_threshold",
    ),
}

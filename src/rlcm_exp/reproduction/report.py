"""A reproduction's report: OUT/<scale>/report.md with the paper's figures (PNGs next to it), the
time-to-threshold, seconds-per-phase and rollout tables, and the exact commands; report.json holds
the same tables as data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlcm_exp.analysis import figures, tables
from rlcm_exp.analysis.runs import Run, find_runs
from rlcm_exp.provenance import git_commit, software_versions
from rlcm_exp.reproduction.plan import Outcome, RunSpec, Scale

# What the paper states (sec. 6) about its method against the baseline: the training-time speed-up per
# task where it gives a number, and the rollout time.
PAPER_TRAINING_SPEEDUP = {"aesthetic": "17x (GPU-hours)"}
PAPER_ROLLOUT_RATIO = "~4x (a full RLCM rollout takes about a quarter of a DDPO rollout)"


def write_report(
    scale_dir: Path,
    scale: Scale,
    specs: list[RunSpec],
    outcome: Outcome,
    evals: list[dict[str, Any]],
    figs: tuple[str, ...],
    thresholds: dict[str, float],
    invocation: str,
    elapsed_s: float,
) -> Path:
    """report.md (+ report.json and the PNGs) from the finished runs' metrics files."""
    wanted = {s.name: s for s in specs}
    runs = [r for r in find_runs(scale_dir / "runs") if r.path.name in wanted and r.finished]
    main = [r for r in runs if wanted[r.path.name].kind == "main"]
    lines = _header(scale, outcome, invocation, elapsed_s)
    table: list[dict[str, Any]] = []
    compare = scale.compare
    phases = tables.phase_table(runs, compare)
    if main and {"4", "5"} & set(figs):
        table = tables.threshold_table(
            main, thresholds=thresholds, compare=compare, paper=PAPER_TRAINING_SPEEDUP
        )
        lines += _training_sections(scale_dir, scale, main, figs, table, phases)
    rollout: list[dict[str, Any]] = []
    if evals and "6" in figs:
        rollout = tables.rollout_table(evals, compare, PAPER_ROLLOUT_RATIO)
        lines += _inference_section(scale_dir, scale, evals, rollout)
    if "7" in figs:
        lines += _horizon_section(scale_dir, scale, runs)
    versions = software_versions()
    lines += _provenance_section(outcome, invocation, versions)
    path = scale_dir / "report.md"
    path.write_text("\n".join(lines))
    write_json(
        scale_dir / "report.json",
        {
            "scale": scale.name,
            "threshold_table": table,
            "phase_table": phases,
            "rollout_table": rollout,
            "runs": [str(r.path.relative_to(scale_dir)) for r in runs],  # relative: the report folder moves
            "failed": outcome.failed,
            "versions": versions,
        },
    )
    return path


def _header(scale: Scale, outcome: Outcome, invocation: str, elapsed_s: float) -> list[str]:
    lines = [
        f"# {scale.method.upper()} vs {scale.baseline.upper()}, {scale.name} scale",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{invocation}` in {elapsed_s:.0f} s "
        f"({outcome.counts()}).",
        "",
        scale.notes,
        "",
    ]
    return lines + outcome.failed_lines()


def _training_sections(
    scale_dir: Path,
    scale: Scale,
    main: Sequence[Run],
    figs: tuple[str, ...],
    table: list[dict[str, Any]],
    phases: list[dict[str, Any]],
) -> list[str]:
    """Figs. 4 and 5 (reward against reward queries and GPU-hours), the time-to-threshold table and
    the seconds per epoch by phase."""
    lines: list[str] = []
    tasks = [t for t in scale.tasks if any(r.task == t for r in main)]
    if "4" in figs:
        title = f"Fig. 4: reward vs reward queries (mean +- std over seeds), {scale.name} scale: {scale_dir}"
        figures.training_figure(
            main, "reward_queries", scale_dir / "fig4_reward_vs_queries.png", title, tasks
        )
        lines += ["## Fig. 4: sample complexity", "", "![fig4](fig4_reward_vs_queries.png)", ""]
    if "5" in figs:
        title = f"Fig. 5: reward vs GPU-hours (mean +- std over seeds), {scale.name} scale: {scale_dir}"
        figures.training_figure(main, "gpu_hours", scale_dir / "fig5_reward_vs_gpu_hours.png", title, tasks)
        lines += ["## Fig. 5: training time", "", "![fig5](fig5_reward_vs_gpu_hours.png)", ""]
    per_task = {r["task"]: (r["threshold"], r["threshold_source"]) for r in table}
    return lines + [
        "## Time to threshold",
        "",
        "Threshold per task: "
        + ", ".join(f"{task} {tables.fmt(th)} ({source})" for task, (th, source) in per_task.items())
        + ". Time to threshold is the first epoch at which the seed-mean reward reaches it, read on the "
        f"seed-mean time axis; speed-up = {scale.baseline.upper()}'s time / {scale.method.upper()}'s time "
        "(paper: 17x on aesthetic in GPU-hours).",
        "",
        tables.threshold_markdown(table, scale.compare),
        "## Seconds per epoch",
        "",
        "Mean over every epoch of every seed, from metrics.jsonl. Reward scoring runs in a worker thread "
        "while the next batch samples, so sampling + reward + training can exceed the epoch's wall-clock. "
        "The last column compares wall-clock per sampled trajectory (the batches may differ).",
        "",
        tables.phase_markdown(phases, scale.compare),
    ]


def _inference_section(
    scale_dir: Path, scale: Scale, evals: list[dict[str, Any]], rollout: list[dict[str, Any]]
) -> list[str]:
    """Fig. 6 (reward against inference seconds per image) and the rollout-time table."""
    figures.inference_figure(
        evals,
        scale_dir / "fig6_inference_budget.png",
        f"Fig. 6: reward vs inference seconds per image (final checkpoints): {scale_dir}",
        scale.colors(),
    )
    return [
        "## Fig. 6: inference-time budget",
        "",
        "Solid: the paper's protocol, a time budget per image (the sampler stops before a step that would "
        "overrun it and decodes its current estimate: the last LCM `denoised`, or DDIM's predicted x0 of the "
        "last step taken), measured on this device. Dashed: full rollouts at fewer steps, at their measured "
        f"seconds per image. Device: {evals[0]['device']}.",
        "",
        "![fig6](fig6_inference_budget.png)",
        "",
        tables.rollout_markdown(rollout, scale.compare),
    ]


def _horizon_section(scale_dir: Path, scale: Scale, runs: Sequence[Run]) -> list[str]:
    """Fig. 7: every run of the horizon task (the method at each H, the baseline for reference); nothing
    without runs."""
    horizon = [r for r in runs if r.task == scale.horizon_task]
    if not horizon:
        return []
    figures.training_figure(
        horizon,
        "gpu_hours",
        scale_dir / "fig7_horizon.png",
        f"Fig. 7: {scale.method.upper()} horizon ablation on {scale.horizon_task} "
        f"({scale.baseline.upper()} for reference), {scale.name} scale: {scale_dir}",
        [scale.horizon_task],
    )
    return ["## Fig. 7: horizon ablation", "", "![fig7](fig7_horizon.png)", ""]


def _provenance_section(outcome: Outcome, invocation: str, versions: dict[str, str]) -> list[str]:
    return [
        "## How this was made",
        "",
        f"Driver: `{invocation}`",
        "",
        f"Code: git commit {git_commit()}",
        "",
        "Training runs (one subprocess each, in this order; finished ones are skipped on a re-run; "
        "paths relative to the directory the driver ran in):",
        "",
        *commands_and_software(outcome, versions),
    ]


def commands_and_software(outcome: Outcome, versions: dict[str, str]) -> list[str]:
    """The runs' commands as a code block (paths relative to the current directory) and the versions."""
    return [
        *outcome.command_block(),
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, default=str))

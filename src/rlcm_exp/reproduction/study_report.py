"""The study's report: OUT/<study>/report.md with the claims table, Figs. 4-7 with 95% bootstrap
intervals over seeds, the time-to-threshold ratios, and before/after samples with what changed;
report.json holds the same numbers."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rlcm_exp.analysis.runs import Run, load_run
from rlcm_exp.analysis.tables import markdown_table
from rlcm_exp.provenance import git_commit, software_versions
from rlcm_exp.reproduction import study_figures as figs
from rlcm_exp.reproduction.plan import Outcome, RunSpec
from rlcm_exp.reproduction.report import commands_and_software
from rlcm_exp.reproduction.study import PAPER, VARIANTS, Study, chosen_setting, chosen_steps, final_name
from rlcm_exp.reproduction.study_stats import (
    Group,
    Interval,
    contains,
    difference_interval,
    final_interval,
    make_group,
    mean_ratio_interval,
    per_seed_interval,
    ratio_interval,
    time_interval,
    verdict,
)

PAPER_SPEEDUP = 17.0  # Fig. 5, aesthetic: the method's (RLCM's) training-time advantage in GPU-hours
PAPER_ROLLOUT = 4.0  # sec. 6: a full method rollout takes about a quarter of a baseline (DDPO) one


def setting_of(selection: dict[str, Any], task: str, algo: str, variant: str) -> str:
    return chosen_setting(selection, task, algo) if variant == "tuned" else PAPER


def load_groups(
    folder: Path, study: Study, selection: dict[str, Any], seeds: tuple[int, ...]
) -> dict[tuple[str, str, str], Group]:
    """(task, algo, variant) -> the finished runs' Group (missing when no seed finished)."""
    out = {}
    for task in study.tasks:
        for algo in study.algos:
            for variant in VARIANTS:
                runs = _finished(
                    folder,
                    [final_name(task, algo, setting_of(selection, task, algo, variant), s) for s in seeds],
                )
                if runs:
                    out[(task, algo, variant)] = make_group(runs)
    return out


def _finished(folder: Path, names: list[str]) -> list[Run]:
    runs = []
    for name in names:
        path = folder / "runs" / name
        if (path / "metrics.jsonl").is_file() and (path / "config.yaml").is_file():
            run = load_run(path)
            if run.finished:
                runs.append(run)
    return runs


def horizon_groups(
    folder: Path, study: Study, selection: dict[str, Any], seeds: tuple[int, ...]
) -> dict[int, Group]:
    task, algo = study.horizon_task, study.method
    setting = chosen_setting(selection, task, algo)
    main_h = chosen_steps(study, task, algo, setting)
    out = {}
    for h in study.horizon_steps:
        names = [final_name(task, algo, setting, s, None if h == main_h else h) for s in seeds]
        if runs := _finished(folder, names):
            out[h] = make_group(runs)
    return out


def write(
    folder: Path,
    study: Study,
    selection: dict[str, Any],
    specs: list[RunSpec],
    outcome: Outcome,
    evals: list[dict[str, Any]],
    invocation: str,
    elapsed_s: float,
) -> Path:
    """report.md, report.json and the figures, from the finished final runs."""
    seeds = tuple(sorted({s.seed for s in specs}))
    groups = load_groups(folder, study, selection, seeds)
    horizon = horizon_groups(folder, study, selection, seeds)
    thresholds = {t: float(v) for t, v in selection["thresholds"].items()}
    data = measure(folder, study, selection, groups, horizon, evals, thresholds)
    lines = _header(study, selection, outcome, invocation, elapsed_s, seeds)
    lines += claims_section(study, data)
    lines += training_section(folder, study, groups, thresholds, data)
    lines += rollout_section(folder, study, evals, data)
    lines += horizon_section(folder, study, horizon, groups, selection, data)
    lines += samples_section(folder, study, selection, data)
    lines += _provenance(outcome, invocation)
    (folder / "report.md").write_text("\n".join(lines))
    (folder / "report.json").write_text(json.dumps(_jsonable(data), indent=1))
    return folder / "report.md"


def _jsonable(x: Any) -> Any:
    if isinstance(x, Interval):
        return _jsonable(asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | np.floating):  # JSON has no inf: "never" (not reached in the budget)
        return "never" if np.isposinf(x) else None if np.isnan(x) or np.isinf(x) else float(x)
    return x


def measure(
    folder: Path,
    study: Study,
    selection: dict[str, Any],
    groups: dict[tuple[str, str, str], Group],
    horizon: dict[int, Group],
    evals: list[dict[str, Any]],
    thresholds: dict[str, float],
) -> dict[str, Any]:
    """Every number the report states, with its interval."""
    rows, ratios = [], []
    for (task, algo, variant), g in groups.items():
        th = thresholds[task]
        rows.append(
            {
                "task": task,
                "algo": algo,
                "variant": variant,
                "setting": setting_of(selection, task, algo, variant),
                "seeds": g.n,
                "epochs": int(g.reward.shape[1]),
                "final_reward": final_interval(g, study.smooth),
                "time_to_threshold_s": time_interval(g, "wallclock_s", th, study.smooth),
                "queries_to_threshold": time_interval(g, "reward_queries", th, study.smooth),
                "sample_s_per_traj": per_seed_interval(_sample_seconds(g)),
            }
        )
    for task in study.tasks:
        for variant in VARIANTS:
            r, d = groups.get((task, study.method, variant)), groups.get((task, study.baseline, variant))
            if r is None or d is None:
                continue
            ratios.append(
                {
                    "task": task,
                    "variant": variant,
                    "wallclock": ratio_interval(d, r, "wallclock_s", thresholds[task], study.smooth),
                    "queries": ratio_interval(d, r, "reward_queries", thresholds[task], study.smooth),
                    "rollout": mean_ratio_interval(_sample_seconds(d), _sample_seconds(r)),
                }
            )
    return {
        "thresholds": thresholds,
        "rows": rows,
        "ratios": ratios,
        "horizon": {h: final_interval(g, study.smooth) for h, g in sorted(horizon.items())},
        "horizon_diffs": _horizon_diffs(horizon, study.smooth),
        "fig6": figs.fig6_rows(evals),
        "images": figs.image_rows(folder, study, selection, groups),
    }


def _sample_seconds(g: Group) -> list[float]:
    """Per seed: sampling seconds per trajectory, mean over the run's rounds."""
    return [
        float(
            np.mean(
                [
                    rec["time_sample_s"] / max(1.0, q)
                    for rec, q in zip(
                        r.records, np.diff([0.0] + [x["reward_queries"] for x in r.records]), strict=True
                    )
                ]
            )
        )
        for r in g.runs
    ]


def _horizon_diffs(horizon: dict[int, Group], smooth: int) -> dict[str, Interval]:
    from rlcm_exp.reproduction.study import smoothed

    finals = {h: [float(smoothed(r, smooth)[-1]) for r in g.reward] for h, g in horizon.items()}
    hs = sorted(finals)
    return {f"H{b}-H{a}": difference_interval(finals[b], finals[a]) for a, b in zip(hs, hs[1:], strict=False)}


def _header(
    study: Study,
    selection: dict[str, Any],
    outcome: Outcome,
    invocation: str,
    elapsed_s: float,
    seeds: tuple[int, ...],
) -> list[str]:
    chosen = "; ".join(
        f"{t}: " + ", ".join(f"{a.upper()} `{c[a]}`" for a in study.algos if a in c)
        for t, c in selection["chosen"].items()
    )
    lines = [
        f"# {study.method.upper()} vs {study.baseline.upper()}: the {study.name} study",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{invocation}` at git commit {git_commit()} in "
        f"{elapsed_s:.0f} s ({outcome.counts()}). The tuning it reads: [../{study.name}-tune/tune.md](../{study.name}-tune/tune.md) "
        f"(commit {selection.get('commit', '?')[:12]}).",
        "",
        study.notes,
        "",
        f"Final runs: seeds {', '.join(map(str, seeds))}, {study.budget_s:g} s of training wall-clock each "
        f"(conf/study/{study.name}.yaml). Chosen settings: {chosen}. Thresholds (from the tuning's best "
        "starting reward): " + ", ".join(f"{t} {v:.4g}" for t, v in selection["thresholds"].items()) + ". "
        "Intervals are 95% percentile bootstraps over seeds; `never`: the smoothed seed-mean reward did not "
        "reach the threshold within the budget. Times are wall-clock on this 2-core CPU, one thread per run, "
        "two runs at a time.",
        "",
    ]
    return lines + outcome.failed_lines()


def claims_section(study: Study, data: dict[str, Any]) -> list[str]:
    """One row per (claim, comparison): the toy-scale verdict with its numbers."""
    m, ratio = study.method.upper(), f"{study.baseline.upper()}/{study.method.upper()}"
    cells = []
    for r in data["ratios"]:
        label = "tuned vs tuned" if r["variant"] == "tuned" else "paper vs paper"
        cells.append(
            [
                f"Fig. 4: {m} needs fewer reward queries (sample complexity)",
                f"{r['task']}, {label}",
                f"{ratio} queries to threshold {r['queries'].text()}",
                verdict(r["queries"]),
            ]
        )
        w = r["wallclock"]
        magnitude = _magnitude(w, PAPER_SPEEDUP)
        cells.append(
            [
                f"Fig. 5: {m} trains {PAPER_SPEEDUP:g}x faster (time to the same reward)",
                f"{r['task']}, {label}",
                f"{ratio} wall-clock to threshold {w.text()} {magnitude}",
                verdict(w),
            ]
        )
        ro = r["rollout"]
        cells.append(
            [
                f"Sec. 6: a rollout is ~{PAPER_ROLLOUT:g}x faster",
                f"{r['task']}, {label}",
                f"{ratio} sampling s per trajectory {ro.text()} " + _magnitude(ro, PAPER_ROLLOUT),
                verdict(ro),
            ]
        )
    diffs = data["horizon_diffs"]
    if diffs:
        text = ", ".join(f"{k} {v.text()}" for k, v in diffs.items())
        worst = min(
            (verdict(v, 0.0) for v in diffs.values()),
            key=["does not hold", "inconclusive at this power", "holds"].index,
        )
        cells.append(["Fig. 7: more steps, higher reward", "final reward at equal wall-clock", text, worst])
    for row in data["images"]:
        if row["variant"] != "tuned" or "compression" not in row["task"]:
            continue
        d = row["diversity_change"]
        cells.append(
            [
                "Sec. 6: over-optimisation (flat images, less variety)",
                f"{row['task']}, {row['algo']}",
                f"diversity after - before {d.text()}; caption fidelity after - before {row['fidelity_change'].text()}",
                "holds" if d.hi < 0 else ("does not hold" if d.lo > 0 else "inconclusive at this power"),
            ]
        )
    return [
        "## Claims",
        "",
        markdown_table(["paper's claim", "comparison", "toy-scale numbers (95% CI)", "verdict"], cells),
    ]


def _magnitude(ci: Interval, paper: float) -> str:
    """Whether the paper's factor is inside the interval, in words ("" when there is no ratio)."""
    if np.isnan(ci.value):
        return ""
    where = "inside" if contains(ci, paper) else "outside"
    open_end = "; a lower bound, no upper end" if ci.bound == ">=" else ""
    return f"({paper:g}x {where} the interval{open_end})"


def training_section(
    folder: Path,
    study: Study,
    groups: dict[tuple[str, str, str], Group],
    thresholds: dict[str, float],
    data: dict[str, Any],
) -> list[str]:
    for axis, png in (
        ("reward_queries", "fig4_reward_vs_queries.png"),
        ("gpu_hours", "fig5_reward_vs_gpu_hours.png"),
    ):
        figs.training_bands(groups, axis, folder / png, study.tasks, thresholds, study.colors)
    m, b = study.method.upper(), study.baseline.upper()
    cells = [
        [
            r["task"],
            r["algo"],
            r["variant"],
            r["setting"],
            str(r["seeds"]),
            str(r["epochs"]),
            r["final_reward"].text(4),
            r["time_to_threshold_s"].text(),
            r["queries_to_threshold"].text(),
        ]
        for r in data["rows"]
    ]
    ratio_cells = [
        [r["task"], r["variant"], r["wallclock"].text(), r["queries"].text()] for r in data["ratios"]
    ]
    return [
        "## Fig. 4 and Fig. 5: reward vs reward queries and vs GPU-hours",
        "",
        "Solid: the chosen (tuned) settings; dashed: the paper-faithful ones. Bands: 95% bootstrap over seeds "
        "of the seed-mean reward; dotted line: the threshold.",
        "",
        "![fig4](fig4_reward_vs_queries.png)",
        "",
        "![fig5](fig5_reward_vs_gpu_hours.png)",
        "",
        markdown_table(
            [
                "task",
                "algo",
                "variant",
                "setting",
                "seeds",
                "epochs (all seeds)",
                "final reward",
                "time to threshold (s)",
                "reward queries to threshold",
            ],
            cells,
        ),
        f"Time-to-threshold ratios, {b} / {m} (> 1: {m} faster):",
        "",
        markdown_table(["task", "comparison", "wall-clock", "reward queries"], ratio_cells),
    ]


def rollout_section(
    folder: Path, study: Study, evals: list[dict[str, Any]], data: dict[str, Any]
) -> list[str]:
    lines = ["## Fig. 6: inference-time budget", ""]
    if not evals:
        return lines + ["No evaluation results.", ""]
    figs.inference_bands(evals, folder / "fig6_inference_budget.png", study.colors)
    cells = [
        [r["task"], r["algo"], str(r["num_steps"]), r["seconds_per_image"].text(), r["reward"].text(4)]
        for r in data["fig6"]
    ]
    return lines + [
        "The chosen settings' final checkpoints of every seed (`python -m rlcm_exp.evaluate`, 9 held-out "
        "compositions x 4 seeds). Solid: a time budget per image (the sampler stops before a step that would "
        "overrun it and decodes its current estimate); dashed: full rollouts at fewer steps. Bands and "
        "intervals: 95% bootstrap over the seeds' checkpoints.",
        "",
        "![fig6](fig6_inference_budget.png)",
        "",
        markdown_table(["task", "algo", "steps", "s/image (full rollout)", "held-out reward"], cells),
    ]


def horizon_section(
    folder: Path, study: Study, horizon: dict[int, Group], groups: dict[tuple[str, str, str], Group],
    selection: dict[str, Any], data: dict[str, Any],
) -> list[str]:  # fmt: skip
    if not horizon:
        return []
    baseline = groups.get((study.horizon_task, study.baseline, "tuned"))
    figs.horizon_bands(
        study, horizon, baseline, folder / "fig7_horizon.png", data["thresholds"][study.horizon_task]
    )
    cells = [[f"H = {h}", ci.text(4)] for h, ci in data["horizon"].items()]
    cells += [[k, v.text(3)] for k, v in data["horizon_diffs"].items()]
    return [
        "## Fig. 7: horizon ablation",
        "",
        f"{study.method.upper()}'s chosen setting on {study.horizon_task} "
        f"(`{chosen_setting(selection, study.horizon_task, study.method)}`) retrained at each H for the same "
        f"{study.budget_s:g} s; {study.baseline.upper()}'s chosen setting for reference.",
        "",
        "![fig7](fig7_horizon.png)",
        "",
        markdown_table(["H", "final reward (smoothed), 95% CI"], cells),
    ]


def samples_section(folder: Path, study: Study, selection: dict[str, Any], data: dict[str, Any]) -> list[str]:
    lines = [
        "## What each algorithm learned",
        "",
        "Read off the first and the last training round's images of every seed (chosen settings; "
        "diversity: mean pairwise RMS distance of 8x8-averaged images; caption fidelity: the toy "
        "detector's score; foreground: share of pixels unlike the image's border). Changes are last - "
        "first round, 95% bootstrap over seeds.",
        "",
    ]
    for task in study.tasks:
        path = figs.sample_grid(
            folder, study, task, selection, study.seeds[0], folder / f"samples_{task}.png"
        )
        mine = [r for r in data["images"] if r["task"] == task and r["variant"] == "tuned"]
        lines += [f"### {task}", ""]
        lines += [f"- **{r['algo'].upper()}**: {figs.describe_change(r)}" for r in mine]
        if path is not None:
            lines += ["", f"![samples {task}]({path.name})", ""]
    return lines


def _provenance(outcome: Outcome, invocation: str) -> list[str]:
    versions = software_versions()
    return [
        "## How this was made",
        "",
        f"`make reproduce-paper SCALE=toy-tune`, then `{invocation}` (`make reproduce-paper SCALE=toy`).",
        "",
        "Training runs (one subprocess each, two at a time; paths relative to the directory the driver ran in):",
        "",
        *commands_and_software(outcome, versions),
    ]

"""A fair comparison study (conf/study/<name>.yaml): a tuning grid per algorithm, a selection rule and
thresholds fixed in advance, then fresh-seed runs at the chosen and the paper-faithful settings.

Two stages, each a `python -m rlcm_exp.reproduce` scale: `<name>-tune` trains every setting of every
algorithm on every task at the tuning seed and writes OUT/<name>-tune/{selection.json,tune.md};
`<name>` reads that selection and trains the final runs (`plan_final`). A run's overrides, in order:

    algo=A task=T seed=S, common, [final_overrides], settings.NAME.overrides, settings.NAME.task_overrides.T,
    train.max_wallclock_s=budget, [sampler.num_steps=H: the horizon runs of Fig. 7]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlcm_exp.analysis.runs import Run
from rlcm_exp.errors import ConfigError
from rlcm_exp.reproduction.plan import RunSpec, check_algos, conf_names, read_conf

PAPER = "paper"  # the setting name every algorithm must have: the paper's numbers
TUNE_SUFFIX = "-tune"
VARIANTS = ("tuned", PAPER)  # what the final runs compare


@dataclass(frozen=True)
class Setting:
    overrides: tuple[str, ...]
    task_overrides: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Study:
    """conf/study/<name>.yaml (see it for each field's meaning and unit)."""

    name: str
    notes: str
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    budget_s: float
    common: tuple[str, ...]
    final_overrides: tuple[str, ...]  # after common, final runs only
    tune_seed: int
    tune_budget_s: float
    thresholds: dict[str, dict[str, float]]
    smooth: int
    horizon_task: str
    horizon_steps: tuple[int, ...]
    eval_steps: dict[str, tuple[int, ...]]
    eval_overrides: tuple[str, ...]
    settings: dict[str, dict[str, Setting]]  # algo -> name -> setting, in file order
    method: str  # the paper's method (a settings key): the claims' numerator side, Fig. 7's H ablation
    baseline: str  # what it is compared with (a settings key)
    colors: dict[str, str | None]  # algo -> matplotlib colour (None: the default cycle)

    @property
    def algos(self) -> tuple[str, ...]:
        """The algorithms the study compares (its file's algos, in file order)."""
        return tuple(self.settings)


def study_names() -> list[str]:
    return conf_names("study")


def scale_is_study(scale: str) -> bool:
    return scale.removesuffix(TUNE_SUFFIX) in study_names()


def load_study(name: str) -> Study:
    """conf/study/<name>.yaml as a Study; a missing or malformed key is a ConfigError naming it."""
    where = f"conf/study/{name}.yaml"
    data = read_conf("study", name, "study")
    try:
        tuning, algos = data["tuning"], data["algos"]
        check_algos(list(algos), (data["method"], data["baseline"]), where)
        settings = {str(a): _settings(part, f"{where}: algos.{a}") for a, part in algos.items()}
        study = Study(
            name=name,
            notes=str(data["notes"]),
            tasks=tuple(str(t) for t in data["tasks"]),
            seeds=tuple(int(s) for s in data["seeds"]),
            budget_s=float(data["budget_s"]),
            common=tuple(str(o) for o in data["common"]),
            final_overrides=tuple(str(o) for o in data.get("final_overrides") or ()),
            tune_seed=int(tuning["seed"]),
            tune_budget_s=float(tuning["budget_s"]),
            thresholds={
                str(t): {str(k): float(v) for k, v in r.items()} for t, r in tuning["thresholds"].items()
            },
            smooth=int(tuning["smooth"]),
            horizon_task=str(data["horizon_task"]),
            horizon_steps=tuple(int(h) for h in data["horizon_steps"]),
            eval_steps={a: tuple(int(s) for s in data["eval_steps"][a]) for a in settings},
            eval_overrides=tuple(str(o) for o in data["eval_overrides"]),
            settings=settings,
            method=str(data["method"]),
            baseline=str(data["baseline"]),
            colors={
                str(a): None if part.get("color") is None else str(part["color"]) for a, part in algos.items()
            },
        )
    except KeyError as err:
        raise ConfigError(f"{where}: missing key {err}") from None
    if missing := set(study.tasks) - set(study.thresholds):
        raise ConfigError(f"{where}: tuning.thresholds has no rule for {', '.join(sorted(missing))}")
    return study


def _settings(data: Any, where: str) -> dict[str, Setting]:
    """An algorithm's `settings` (each with a `paper` one) and its optional `color`."""
    if not isinstance(data, dict) or "settings" not in data or set(data) - {"settings", "color"}:
        raise ConfigError(f"{where}: expected {{settings: {{NAME: ...}}, color: COLOUR}}")
    named = {str(n): _setting(s, f"{where}.settings.{n}") for n, s in data["settings"].items()}
    if PAPER not in named:
        raise ConfigError(f"{where}.settings needs a '{PAPER}' setting")
    return named


def _setting(data: Any, where: str) -> Setting:
    if not isinstance(data, dict) or "overrides" not in data or set(data) - {"overrides", "task_overrides"}:
        raise ConfigError(f"{where}: expected {{overrides: [...], task_overrides: {{task: [...]}}}}")
    extra = data.get("task_overrides") or {}
    return Setting(
        tuple(str(o) for o in data["overrides"]), {str(t): tuple(str(o) for o in v) for t, v in extra.items()}
    )


def run_spec(
    study: Study,
    task: str,
    algo: str,
    setting: str,
    seed: int,
    budget_s: float,
    name: str,
    kind: str,
    extra: tuple[str, ...] = (),
    user: tuple[str, ...] = (),
) -> RunSpec:
    """One training run, its overrides in the order the module docstring gives."""
    chosen = study.settings[algo][setting]
    overrides = (
        f"algo={algo}",
        f"task={task}",
        f"seed={seed}",
        *study.common,
        *(study.final_overrides if kind != "tune" else ()),
        *chosen.overrides,
        *chosen.task_overrides.get(task, ()),
        f"train.max_wallclock_s={budget_s:g}",
        *extra,
        f"++logger.group=study_{study.name}_{task}",
        f"++logger.tags=[study,{study.name},{algo},{kind},{setting}]",
        *user,
    )
    return RunSpec(name, kind, task, algo, seed, overrides, budget_s + 20.0)


def plan_tuning(study: Study, user: tuple[str, ...] = ()) -> list[RunSpec]:
    """Every setting of every algorithm on every task, at the tuning seed and budget."""
    return [
        run_spec(
            study,
            task,
            algo,
            setting,
            study.tune_seed,
            study.tune_budget_s,
            f"{task}_{algo}_{setting}_s{study.tune_seed}",
            "tune",
            user=user,
        )
        for task in study.tasks
        for algo in study.algos
        for setting in study.settings[algo]
    ]


def final_name(task: str, algo: str, setting: str, seed: int, steps: int | None = None) -> str:
    return f"{task}_{algo}_{setting}" + (f"_h{steps}" if steps is not None else "") + f"_s{seed}"


def plan_final(
    study: Study, selection: dict[str, Any], seeds: tuple[int, ...], user: tuple[str, ...] = ()
) -> list[RunSpec]:
    """The chosen and the paper setting of each algorithm and task at every seed (a chosen `paper`
    is trained once), then the method's chosen setting on the horizon task at each other H (Fig. 7)."""
    specs: dict[str, RunSpec] = {}
    for task in study.tasks:
        for algo in study.algos:
            for setting in dict.fromkeys((chosen_setting(selection, task, algo), PAPER)):
                for seed in seeds:
                    name = final_name(task, algo, setting, seed)
                    specs[name] = run_spec(
                        study, task, algo, setting, seed, study.budget_s, name, "main", user=user
                    )
    task, algo = study.horizon_task, study.method
    setting = chosen_setting(selection, task, algo)
    main_h = chosen_steps(study, task, algo, setting)
    for steps in study.horizon_steps:
        if steps == main_h:
            continue
        for seed in seeds:
            name = final_name(task, algo, setting, seed, steps)
            specs[name] = run_spec(
                study,
                task,
                algo,
                setting,
                seed,
                study.budget_s,
                name,
                "horizon",
                (f"sampler.num_steps={steps}",),
                user,
            )
    return list(specs.values())


def chosen_setting(selection: dict[str, Any], task: str, algo: str) -> str:
    try:
        return str(selection["chosen"][task][algo])
    except KeyError:
        raise ConfigError(
            f"the tuning selection has no choice for {task}/{algo}: run the tuning scale first"
        ) from None


def chosen_steps(study: Study, task: str, algo: str, setting: str) -> int:
    """sampler.num_steps of a setting (its last override of it)."""
    chosen = study.settings[algo][setting]
    values = [
        o.split("=", 1)[1]
        for o in (*chosen.overrides, *chosen.task_overrides.get(task, ()))
        if o.startswith("sampler.num_steps=")
    ]
    if not values:
        raise ConfigError(
            f"conf/study/{study.name}.yaml: algos.{algo}.settings.{setting} must set sampler.num_steps"
        )
    return int(values[-1])


# ---------------------------------------------------------------------------- the selection rule


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean: entry i averages values[max(0, i - window + 1) : i + 1]."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def threshold_from_start(start: float, rule: dict[str, float]) -> float:
    """The task's threshold from the best starting reward (conf/study's `tuning.thresholds`)."""
    if "relative" in rule:
        return start + rule["relative"] * abs(start)
    return start + rule["gap"] * (rule["max"] - start)


def first_crossing(times: np.ndarray, rewards: np.ndarray, threshold: float) -> float | None:
    """The time of the first point at which `rewards` >= threshold (every reward is higher-is-better)."""
    hit = np.nonzero(np.asarray(rewards) >= threshold)[0]
    return float(times[hit[0]]) if len(hit) else None


def select(study: Study, runs: dict[str, Run]) -> dict[str, Any]:
    """Thresholds from the tuning runs' starting rewards, then each (task, algo)'s chosen setting by the
    rule in conf/study: least wall-clock to the threshold, else the highest smoothed final reward."""
    rows: list[dict[str, Any]] = []
    thresholds: dict[str, float] = {}
    chosen: dict[str, dict[str, str]] = {}
    for task in study.tasks:
        mine = {key: r for key, r in runs.items() if r.task == task}
        starts = [r.records[0]["reward_mean"] for r in mine.values() if r.records]
        if not starts:
            continue
        start = max(starts)
        thresholds[task] = threshold_from_start(start, study.thresholds[task])
        chosen[task] = {}
        for algo in study.algos:
            cands = []
            for setting in study.settings[algo]:
                run = mine.get(f"{task}_{algo}_{setting}_s{study.tune_seed}")
                if run is None or not run.records:
                    continue
                wall = np.array([rec["wallclock_s"] for rec in run.records])
                reward = smoothed(np.array([rec["reward_mean"] for rec in run.records]), study.smooth)
                t_hit = first_crossing(wall, reward, thresholds[task])
                row = {
                    "task": task,
                    "algo": algo,
                    "setting": setting,
                    "start_reward": run.records[0]["reward_mean"],
                    "final_reward": float(reward[-1]),
                    "epochs": len(run.records),
                    "wallclock_s": float(wall[-1]),
                    "median_epoch_s": float(np.median(np.diff(wall, prepend=0.0))),
                    "time_to_threshold_s": t_hit,
                }
                rows.append(row)
                cands.append(row)
            if cands:
                reached = [c for c in cands if c["time_to_threshold_s"] is not None]
                best = (
                    min(reached, key=lambda c: c["time_to_threshold_s"])
                    if reached
                    else max(cands, key=lambda c: c["final_reward"])
                )
                best["chosen"] = True
                chosen[task][algo] = best["setting"]
    mark_slowed(rows, study)
    return {
        "study": study.name,
        "best_start": {t: max(r["start_reward"] for r in rows if r["task"] == t) for t in thresholds},
        "thresholds": thresholds,
        "chosen": chosen,
        "rows": rows,
    }


SLOWED = 1.25  # a run whose median epoch took this much longer than its twins' was slowed by other load


def mark_slowed(rows: list[dict[str, Any]], study: Study) -> None:
    """Flag `slowed` on tuning rows whose median epoch took > SLOWED x the fastest twin's (the same
    algorithm and setting on another task, with the same per-task overrides: the same compute per
    epoch), so that other load on the machine is visible in the table and such runs can be re-run."""

    def twin(r: dict[str, Any]) -> tuple[str, str, tuple[str, ...]]:
        return (
            r["algo"],
            r["setting"],
            study.settings[r["algo"]][r["setting"]].task_overrides.get(r["task"], ()),
        )

    fastest: dict[tuple[str, str, tuple[str, ...]], float] = {}
    for r in rows:
        fastest[twin(r)] = min(fastest.get(twin(r), float("inf")), r["median_epoch_s"])
    for r in rows:
        r["slowed"] = bool(r["median_epoch_s"] > SLOWED * fastest[twin(r)])


def read_selection(path: Path) -> dict[str, Any]:
    """OUT/<study>-tune/selection.json, written by the tuning stage."""
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: run the tuning first (make reproduce-paper SCALE={path.parent.name})"
        )
    return json.loads(path.read_text())

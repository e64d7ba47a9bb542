"""What a reproduction trains: its scale (conf/reproduce/<scale>.yaml) and the planned runs.

A scale is data: the tasks, seeds, stated thresholds and the Hydra overrides of every training run,
plus rough costs for the plan's time estimate. A planned run's overrides, in order (Hydra keeps the
last value of a key, so later entries win):

    algo=A task=T seed=S, common, algos.A.overrides, algos.A.task_overrides.T,
    [sampler.num_steps=H: the horizon runs of Fig. 7], the wandb group and tags, --override values
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlcm_exp.configs import conf_dir
from rlcm_exp.errors import ConfigError

FIGURES = ("4", "5", "6", "7")  # the paper's figures a reproduction can draw


@dataclass(frozen=True)
class AlgoScale:
    """One algorithm's part of a scale (see conf/reproduce/*.yaml for each field's meaning and unit)."""

    overrides: tuple[str, ...]  # after the scale's common overrides
    eval_steps: tuple[int, ...]  # step counts timed and scored as full rollouts in Fig. 6
    epoch_seconds: float  # plan estimate: seconds per epoch at main_steps and the common batch
    main_steps: int  # plan estimate: the main H (the config decides the real one)
    task_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)  # after `overrides`, per task
    color: str | None = None  # matplotlib colour in every figure; None: the next of the default cycle


@dataclass(frozen=True)
class Scale:
    """What one scale runs (see conf/reproduce/*.yaml for each field's meaning and unit)."""

    name: str  # the file's name: full | toy | smoke
    notes: str  # said in the report
    tasks: tuple[str, ...]  # task options compared in Figs. 4-6
    seeds: tuple[int, ...]  # seeds of every training run
    common: tuple[str, ...]  # overrides of every training run
    algos: dict[str, AlgoScale]  # per algorithm the scale knows (conf/algo/ options), in file order
    method: str  # the paper's method (an algos key): trained by default, retrained at each H for Fig. 7
    baseline: str  # what it is compared with (an algos key): trained by default
    horizon_task: str  # task of the Fig. 7 ablation
    horizon_steps: tuple[int, ...]  # extra horizons H of the method trained for Fig. 7 (the main H is reused)
    eval_overrides: tuple[str, ...]  # conf/evaluate.yaml overrides of the inference evaluation
    eval_seeds: tuple[int, ...]  # training seeds whose final checkpoints are evaluated for Fig. 6
    startup_seconds: float  # plan estimate: per-run process start + model load
    eval_seconds: float  # plan estimate: per evaluated checkpoint
    thresholds: dict[str, float] = field(default_factory=dict)  # stated time-to-threshold reward per task

    @property
    def compare(self) -> tuple[str, str]:
        """(method, baseline): the paper's comparison, what `--algos` trains when not given."""
        return (self.method, self.baseline)

    def colors(self) -> dict[str, str | None]:
        """Each algorithm's colour in the figures (None: matplotlib's default cycle)."""
        return {name: algo.color for name, algo in self.algos.items()}


def conf_names(group: str) -> list[str]:
    """The files of conf/<group>/ (algo, reproduce, study) by name, sorted."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def read_conf(group: str, name: str, what: str) -> dict[str, Any]:
    """conf/<group>/<name>.yaml as a dict, interpolations resolved; a missing file is a ConfigError
    naming the `what`s there are."""
    path = conf_dir() / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {what} '{name}': choose from {', '.join(conf_names(group))}")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def algo_names() -> list[str]:
    """The algorithms there are: the options of conf/algo/, sorted."""
    return conf_names("algo")


def check_algos(algos: Sequence[str], pair: Sequence[str], where: str) -> None:
    """Every name of `algos` is a conf/algo/ option and each of `pair` (method, baseline) one of
    `algos`; else a ConfigError naming the valid ones."""
    if unknown := [a for a in algos if a not in algo_names()]:
        raise ConfigError(
            f"{where}: algos {', '.join(unknown)} not in conf/algo/ (choose from {', '.join(algo_names())})"
        )
    if missing := [a for a in pair if a not in algos]:
        raise ConfigError(f"{where}: method/baseline {', '.join(missing)} not in algos ({', '.join(algos)})")


def scale_names() -> list[str]:
    """The scales shipped in conf/reproduce/, sorted."""
    return conf_names("reproduce")


def load_scale(name: str) -> Scale:
    """conf/reproduce/<name>.yaml as a Scale; a missing or unknown key is a ConfigError naming it."""
    data = read_conf("reproduce", name, "reproduction scale")
    where = f"conf/reproduce/{name}.yaml"
    _check_keys(data, Scale, where, skip=frozenset({"name"}))
    algos = data["algos"]
    check_algos(list(algos), (data["method"], data["baseline"]), where)
    return Scale(
        name=name,
        notes=str(data["notes"]),
        tasks=_strs(data["tasks"]),
        seeds=_ints(data["seeds"]),
        common=_strs(data["common"]),
        algos={str(algo): _algo_scale(part, f"{where}: algos.{algo}") for algo, part in algos.items()},
        method=str(data["method"]),
        baseline=str(data["baseline"]),
        horizon_task=str(data["horizon_task"]),
        horizon_steps=_ints(data["horizon_steps"]),
        eval_overrides=_strs(data["eval_overrides"]),
        eval_seeds=_ints(data["eval_seeds"]),
        startup_seconds=float(data["startup_seconds"]),
        eval_seconds=float(data["eval_seconds"]),
        thresholds={str(k): float(v) for k, v in (data.get("thresholds") or {}).items()},
    )


def _algo_scale(data: dict[str, Any], where: str) -> AlgoScale:
    _check_keys(data, AlgoScale, where)
    return AlgoScale(
        overrides=_strs(data["overrides"]),
        eval_steps=_ints(data["eval_steps"]),
        epoch_seconds=float(data["epoch_seconds"]),
        main_steps=int(data["main_steps"]),
        task_overrides={str(k): _strs(v) for k, v in (data.get("task_overrides") or {}).items()},
        color=None if data.get("color") is None else str(data["color"]),
    )


def _check_keys(data: Mapping[Any, Any], cls: type, where: str, skip: frozenset[str] = frozenset()) -> None:
    """Every key of `data` is a field of `cls`, and every field without a default is there."""
    names = {f.name for f in fields(cls)} - skip
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} - skip
    if unknown := set(data) - names:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}"
        )
    if missing := required - set(data):
        raise ConfigError(f"{where}: missing key(s) {', '.join(sorted(missing))}")


def _strs(values: Sequence[Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in values)


def _ints(values: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class RunSpec:
    name: str  # folder under runs/
    kind: str  # main | horizon
    task: str
    algo: str
    seed: int
    overrides: tuple[str, ...]  # everything but hydra.run.dir
    est_seconds: float  # plan estimate


def plan_runs(
    scale: Scale,
    seeds: tuple[int, ...],
    figures: tuple[str, ...],
    user: tuple[str, ...] = (),
    algos: tuple[str, ...] | None = None,
) -> list[RunSpec]:
    """The training runs the chosen figures need for `algos` (each must be in the scale; default: its
    method and baseline); Fig. 7 reuses the method's main run as its main H."""
    algos = scale.compare if algos is None else algos
    if missing := [a for a in algos if a not in scale.algos]:
        raise ConfigError(
            f"--algos: {', '.join(missing)} not in conf/reproduce/{scale.name}.yaml's algos ({', '.join(scale.algos)})"
        )
    specs = []
    # Fig. 7 alone still needs its task's main runs: its main H and the baseline's reference
    tasks = scale.tasks if {"4", "5", "6"} & set(figures) else (scale.horizon_task,) if "7" in figures else ()
    for task in tasks:
        for algo in algos:
            for seed in seeds:
                specs.append(plan_run(scale, "main", task, algo, seed, (), user))
    if "7" in figures:
        for steps in scale.horizon_steps:
            for seed in seeds:
                extra = (f"sampler.num_steps={steps}",)
                specs.append(plan_run(scale, "horizon", scale.horizon_task, scale.method, seed, extra, user))
    return specs


def last_int(overrides: Sequence[str], key: str, default: int) -> int:
    """The value the last `key=N` override sets (the one Hydra keeps), or `default`."""
    return next((int(o.split("=", 1)[1]) for o in overrides[::-1] if o.startswith(f"{key}=")), default)


def plan_run(
    scale: Scale,
    kind: str,
    task: str,
    algo: str,
    seed: int,
    extra: tuple[str, ...],
    user: tuple[str, ...] = (),
) -> RunSpec:
    """One training run: its folder name, overrides (in the order the module docstring gives) and
    estimated seconds."""
    part = scale.algos[algo]
    overrides = (
        f"algo={algo}",
        f"task={task}",
        f"seed={seed}",
        *scale.common,
        *part.overrides,
        *part.task_overrides.get(task, ()),
        *extra,
        # wandb grouping (ignored by logger=none): one group per scale and task, as the paper's figures
        f"++logger.group=reproduce_{scale.name}_{task}",
        f"++logger.tags=[reproduce,{scale.name},{algo},{kind}]",
        *user,  # --override: last, so they win
    )
    steps = last_int(extra, "sampler.num_steps", 0) or None  # set only by the horizon runs
    name = f"{task}_{algo}" + (f"_h{steps}" if steps is not None else "") + f"_s{seed}"
    epochs = last_int(overrides, "train.epochs", 0) or composed_epochs(overrides)
    # epoch_seconds is at the main H and the common batch; scale by this run's steps and batch
    run_steps = last_int(overrides, "sampler.num_steps", part.main_steps)
    batch, common_batch = (
        last_int(overrides, "train.samples_per_epoch", 1),
        last_int(scale.common, "train.samples_per_epoch", 1),
    )
    per_epoch = part.epoch_seconds * run_steps / part.main_steps * batch / common_batch
    return RunSpec(name, kind, task, algo, seed, overrides, scale.startup_seconds + epochs * per_epoch)


def composed_epochs(overrides: tuple[str, ...]) -> int:
    """train.epochs of the run's composed config, where no override sets it (the paper configs do)."""
    from rlcm_exp.configs import compose

    return int(compose(overrides=list(overrides)).train.epochs)


def estimate(specs: list[RunSpec], scale: Scale, eval_count: int, jobs: int = 1) -> float:
    """Plan seconds: training runs spread over `jobs` workers, then the evaluations one by one."""
    return sum(s.est_seconds for s in specs) / max(1, jobs) + eval_count * scale.eval_seconds


def eval_seeds(scale: Scale, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The training seeds whose final checkpoints Fig. 6 evaluates: the scale's among those trained,
    else the first trained seed."""
    return tuple(s for s in scale.eval_seeds if s in seeds) or seeds[:1]


def parse_figures(text: str) -> tuple[str, ...]:
    """Parse "4,5,6" into ("4", "5", "6"); an unknown figure is a ValueError naming it."""
    figures = tuple(f.strip() for f in text.split(",") if f.strip())
    if bad := set(figures) - set(FIGURES):
        raise ValueError(f"unknown {sorted(bad)}; choose from {','.join(FIGURES)}")
    return figures


def parse_thresholds(items: Sequence[str]) -> dict[str, float]:
    """Parse ["toy_compression=-0.9"] into {"toy_compression": -0.9}."""
    out = {}
    for item in items:
        task, _, value = item.partition("=")
        out[task] = float(value)
    return out


@dataclass
class Outcome:
    """What running a plan did, each list in plan order."""

    ran: list[str] = field(default_factory=list)  # trained now and finished
    skipped: list[str] = field(default_factory=list)  # already finished
    failed: list[str] = field(default_factory=list)  # trained now, not finished (see RUN/stdout.log)
    commands: list[str] = field(default_factory=list)  # every planned run's command line

    def counts(self) -> str:
        """The counts a report's first line gives: "N runs trained, N already finished, N failed"."""
        return (
            f"{len(self.ran)} runs trained, {len(self.skipped)} already finished, {len(self.failed)} failed"
        )

    def failed_lines(self) -> list[str]:
        """A report's line naming the failed runs (none when nothing failed)."""
        return [f"**Failed runs** (see RUN/stdout.log): {', '.join(self.failed)}", ""] if self.failed else []

    def command_block(self) -> list[str]:
        """Every planned run's command as a code block, paths relative to the current directory."""
        return ["```", *(c.replace(f"{Path.cwd()}/", "") for c in self.commands), "```", ""]


def scale_dir(out: Path, scale: Scale) -> Path:
    """OUT/<scale>: the report, the figures and runs/."""
    return (out / scale.name).resolve()

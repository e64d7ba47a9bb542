"""Run folders and what they recorded: any folder holding both config.yaml and metrics.jsonl.

Runs that differ only in their seed form a group; a group's curve is the seed mean (and std) of a
metric at each epoch, plotted against the seed mean of a time axis (reward queries, GPU-hours,
wall-clock) at that epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.errors import ConfigError
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
        """checkpoints/final exists and the run did all its epochs or spent its train.max_wallclock_s."""
        budget = self.flat_config.get("train.max_wallclock_s")
        spent = budget is not None and bool(self.records) and self.records[-1]["wallclock_s"] >= float(budget)
        done = len(self.records) >= self.epochs or spent
        return done and (self.path / "checkpoints" / "final").is_dir()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl or eval.jsonl, or a ConfigError naming the file when it
    is not one (undecodable bytes, a line that is not a JSON object)."""
    try:
        records = read_metrics(path)
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise ConfigError(
            f"{path}: cannot be read as records ({type(err).__name__}: {str(err)[:160]}); it is not a "
            "JSON-lines file written by rlcm_exp. Move it aside or restore it."
        ) from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ConfigError(
            f"{path}: record {bad + 1} is a JSON {type(records[bad]).__name__}, not an object of metrics; "
            "the file is damaged or not written by rlcm_exp. Move it aside or restore it."
        )
    return records


def load_run(path: Path) -> Run:
    try:
        cfg = OmegaConf.load(path / "config.yaml")
    except Exception as err:  # yaml's and OmegaConf's errors, undecodable bytes
        raise ConfigError(
            f"{path / 'config.yaml'}: cannot be read ({type(err).__name__}: {str(err)[:160]})"
        ) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path / 'config.yaml'}: not a run config (a mapping)")
    return Run(
        path=path,
        algo=str(OmegaConf.select(cfg, "algo.name", default="?")),
        task=str(OmegaConf.select(cfg, "task.name", default="?")),
        seed=int(OmegaConf.select(cfg, "seed", default=0)),
        num_steps=int(OmegaConf.select(cfg, "sampler.num_steps", default=0)),
        epochs=int(OmegaConf.select(cfg, "train.epochs", default=0)),
        records=read_records(path / "metrics.jsonl"),
        flat_config=flatten(OmegaConf.to_container(cfg, resolve=False)),
    )


def read_evals(run_dir: Path) -> list[dict[str, Any]]:
    """The held-out evaluations of a run (eval.jsonl), [] when it ran none."""
    path = Path(run_dir) / "eval.jsonl"
    return read_records(path) if path.is_file() else []


def is_finished(run_dir: Path) -> bool:
    """checkpoints/final exists and metrics.jsonl holds train.epochs records or reached the budget."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return False
    return load_run(run_dir).finished


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


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, str, int], list[Run]]:
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    return groups


def differing_keys(runs: Sequence[Run], leaves: bool = False) -> list[str]:
    """The config keys whose values differ between the runs (paths left out). Of a group choice only
    its name (algo.name rather than every PPO constant it changes); with `leaves`, also every other
    differing key outside the chosen groups (e.g. optimizer.lr of an LR sweep, train.* set by the
    paper's settings per algorithm), else those only when no name differs."""
    keys = sorted({k for r in runs for k in r.flat_config})
    differ = [
        k
        for k in keys
        if len({repr(r.flat_config.get(k)) for r in runs}) > 1
        and not any(isinstance(r.flat_config.get(k), str) and "/" in r.flat_config[k] for r in runs)
    ]
    named = [k for k in differ if k.endswith(".name") or "." not in k or k.startswith("sampler.num_steps")]
    if not leaves:
        return named or differ
    chosen = {k.rsplit(".", 1)[0] + "." for k in differ if k.endswith((".name", "._target_"))}
    return named + [k for k in differ if k not in named and not k.startswith(tuple(chosen))]


def run_labels(runs: Sequence[Run], max_keys: int = 4) -> list[str]:
    """Name each run by the config values that differ between the runs (`differing_keys`), e.g.
    "algo.name=ddpo, seed=1"; the folder name when nothing differs."""
    shown = differing_keys(runs)[:max_keys]
    if not shown:
        return [r.path.name for r in runs]
    return [", ".join(f"{k}={r.flat_config.get(k)}" for k in shown) for r in runs]


def run_title(run_dir: Path) -> str:
    """A figure's title for one run: its folder (parent/name) and, from its config.yaml, what it trains
    (algorithm, task, model family)."""
    run_dir = Path(run_dir).resolve()
    name = f"{run_dir.parent.name}/{run_dir.name}"
    path = run_dir / "config.yaml"
    if not path.is_file():
        return name
    cfg = OmegaConf.load(path)
    what = [str(OmegaConf.select(cfg, k, default="?")) for k in ("algo.name", "task.name")]
    what.append(
        str(OmegaConf.select(cfg, "model._target_", default="?")).rsplit(".", 1)[-1]
    )  # the family builder
    return f"{name} ({', '.join(what)})"


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
    """x at the first point where the seed-mean y reaches `threshold` (>=: every reward here is
    higher-is-better); None if it never does."""
    hits = np.nonzero(curve.y >= threshold)[0]
    return float(curve.x[hits[0]]) if len(hits) else None

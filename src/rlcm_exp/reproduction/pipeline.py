"""Running a plan, the same way for a scale and a study: each planned training run a subprocess
`python -m rlcm_exp ... hydra.run.dir=FOLDER/runs/<name>`, then the stage's own ending (evaluations
and its report), timed.

Re-running is cheap: a run is finished when its metrics.jsonl has train.epochs records (or reached its
wall-clock budget) and checkpoints/final exists; finished runs are skipped, unfinished ones re-run
(resumed from their newest complete checkpoint when they have one, else from scratch). An inference
evaluation's RUN/<folder>/eval.json is reused while it is newer than the final checkpoint.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rlcm_exp.analysis.runs import is_finished
from rlcm_exp.reproduction.plan import Outcome, RunSpec


@dataclass(frozen=True)
class Launch:
    """How a `python -m rlcm_exp.reproduce` invocation runs its plan (the same for scales and studies)."""

    out: Path  # writes OUT/<scale or stage>/
    launcher: tuple[str, ...]  # what runs `-m rlcm_exp`
    overrides: tuple[str, ...]  # appended to every training run
    jobs: int  # training runs (and study evaluations) at once
    dry_run: bool  # print the plan and its estimate; run nothing
    invocation: str  # the command line, for the report


def run_stage(
    specs: list[RunSpec],
    folder: Path,
    launch: Launch,
    tag: str,
    plan_line: str,
    finish: Callable[[Outcome, float], Path],
) -> Outcome:
    """Print the plan, train what is unfinished under FOLDER/runs, then (not on a dry run)
    `finish(outcome, elapsed seconds)`: the stage's evaluations and report, whose path is printed."""
    print(f"[{tag}] {plan_line}")
    start = time.perf_counter()
    outcome = run_all(specs, folder / "runs", list(launch.launcher), dry_run=launch.dry_run, jobs=launch.jobs)
    if launch.dry_run:
        return outcome
    path = finish(outcome, time.perf_counter() - start)
    print(f"[{tag}] wrote {path}")
    return outcome


def has_resumable_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("epoch_*/COMPLETE"))


def train_command(spec: RunSpec, run_dir: Path, launcher: list[str]) -> list[str]:
    return [*launcher, "rlcm_exp", *spec.overrides, f"hydra.run.dir={run_dir}"]


def child_env(jobs: int) -> dict[str, str]:
    """The environment of a child process: with jobs > 1, OMP_NUM_THREADS = cpu_count // jobs unless
    the caller set it, so parallel CPU runs split the cores instead of fighting over them."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_all(
    specs: list[RunSpec], runs_dir: Path, launcher: list[str], dry_run: bool = False, jobs: int = 1
) -> Outcome:
    """Each unfinished run as a subprocess, `jobs` at a time (child_env); output goes to
    RUN/stdout.log. Outcome lists keep plan order."""
    out = Outcome()
    todo = _queue(specs, runs_dir, launcher, out, dry_run)
    if dry_run or not todo:
        return out
    env = child_env(jobs)

    def run_one(item: tuple[RunSpec, list[str]]) -> tuple[str, bool]:
        spec, cmd = item
        run_dir = runs_dir / spec.name
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with (run_dir / "stdout.log").open("w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        print(f"[reproduce] {spec.name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        return spec.name, rc == 0 and is_finished(run_dir)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, ok in pool.map(run_one, todo):
            (out.ran if ok else out.failed).append(name)
    return out


def _queue(
    specs: list[RunSpec], runs_dir: Path, launcher: list[str], out: Outcome, dry_run: bool
) -> list[tuple[RunSpec, list[str]]]:
    """The runs to train and their commands (a finished run goes to out.skipped; every command to
    out.commands); an unfinished run resumes from its newest complete checkpoint, else restarts."""
    todo: list[tuple[RunSpec, list[str]]] = []
    for spec in specs:
        run_dir = runs_dir / spec.name
        cmd = train_command(spec, run_dir, launcher)
        out.commands.append(shlex.join(cmd))
        if is_finished(run_dir):
            out.skipped.append(spec.name)
            continue
        if run_dir.exists():
            if has_resumable_checkpoint(run_dir):
                cmd.append("resume=auto")
            else:  # a crashed run without a checkpoint: its partial metrics would mix with the new ones
                if not dry_run:
                    shutil.rmtree(run_dir)
        print(
            f"[reproduce] {'would run' if dry_run else 'queued'} {spec.name} (~{spec.est_seconds:.0f} s): {shlex.join(cmd)}"
        )
        todo.append((spec, cmd))
    return todo


def pending_evaluations(
    specs: Sequence[RunSpec],
    runs_dir: Path,
    folder: str,
    steps: Callable[[RunSpec], Sequence[int]],
    eval_overrides: Sequence[str],
) -> tuple[list[Path], list[tuple[RunSpec, list[str]]]]:
    """The inference evaluation (Fig. 6) of each finished run's final checkpoint, written to
    RUN/<folder>/eval.json: every such path, in plan order, and the `python -m rlcm_exp.evaluate`
    overrides of those missing or older than their checkpoint (`steps`: the step counts timed)."""
    paths, todo = [], []
    for spec in specs:
        run_dir = runs_dir / spec.name
        if not is_finished(run_dir):
            continue
        result = run_dir / folder / "eval.json"
        paths.append(result)
        if result.is_file() and result.stat().st_mtime > (run_dir / "checkpoints" / "final").stat().st_mtime:
            continue
        overrides = [
            f"checkpoint={run_dir}",
            f"out={run_dir / folder}",
            f"steps=[{','.join(str(s) for s in steps(spec))}]",
            *eval_overrides,
        ]
        todo.append((spec, overrides))
    return paths, todo

"""Running a reproduction: each planned training run as a subprocess, the inference evaluation of the
final checkpoints (Fig. 6), then the report (`python -m rlcm_exp.reproduce` is the command).

Re-running is cheap: a run is finished when its metrics.jsonl has train.epochs records and
checkpoints/final exists; finished runs are skipped, unfinished ones re-run (resumed from their
newest complete checkpoint when they have one, else from scratch). Inference results are kept
in RUN/eval/eval.json and reused while the final checkpoint is older than them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcm_exp.reproduction import report
from rlcm_exp.reproduction.plan import (
    Outcome,
    RunSpec,
    Scale,
    estimate,
    eval_seeds,
    plan_runs,
    scale_dir,
)
from rlcm_exp.analysis.runs import is_finished
from rlcm_exp.configs import compose


@dataclass(frozen=True)
class Request:
    """One `python -m rlcm_exp.reproduce` invocation, parsed."""

    scale: Scale
    seeds: tuple[int, ...]  # training seeds
    figures: tuple[str, ...]  # which of FIGURES to produce
    out: Path  # writes OUT/<scale>/
    thresholds: dict[str, float]  # --threshold values (win over the scale's)
    launcher: tuple[str, ...]  # what runs `-m rlcm_exp`
    overrides: tuple[str, ...]  # appended to every training run
    jobs: int  # training runs at once
    dry_run: bool  # print the plan and its estimate; run nothing
    invocation: str  # the command line, for the report
    algos: tuple[str, ...] = ("rlcm", "ddpo")  # algorithms trained (each an entry of the scale's algos)


def reproduce(req: Request) -> Outcome:
    """Plan, train what is unfinished, evaluate (Fig. 6) and write OUT/<scale>/report.md (not on a dry
    run); the outcome lists the failed runs."""
    folder = scale_dir(req.out, req.scale)
    runs_dir = folder / "runs"
    specs = plan_runs(req.scale, req.seeds, req.figures, req.overrides, req.algos)
    seeds_6 = eval_seeds(req.scale, req.seeds)
    n_eval = sum(1 for s in specs if s.kind == "main" and s.seed in seeds_6) if "6" in req.figures else 0
    print(
        f"[reproduce] {req.scale.name}: {len(specs)} training runs + {n_eval} checkpoint evaluations, "
        f"estimated {estimate(specs, req.scale, n_eval, req.jobs) / 3600:.2f} h with {req.jobs} job(s) when none has run yet"
    )
    start = time.perf_counter()
    outcome = run_all(specs, runs_dir, list(req.launcher), dry_run=req.dry_run, jobs=req.jobs)
    if req.dry_run:
        return outcome
    evals = evaluate_checkpoints(req.scale, specs, runs_dir, seeds_6) if "6" in req.figures else []
    path = report.write_report(
        folder,
        req.scale,
        specs,
        outcome,
        evals,
        req.figures,
        req.scale.thresholds | req.thresholds,
        req.invocation,
        time.perf_counter() - start,
    )
    print(f"[reproduce] wrote {path}")
    return outcome


def has_resumable_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("epoch_*/COMPLETE"))


def train_command(spec: RunSpec, run_dir: Path, launcher: list[str]) -> list[str]:
    return [*launcher, "rlcm_exp", *spec.overrides, f"hydra.run.dir={run_dir}"]


def run_all(
    specs: list[RunSpec], runs_dir: Path, launcher: list[str], dry_run: bool = False, jobs: int = 1
) -> Outcome:
    """Each unfinished run as a subprocess, `jobs` at a time; output goes to RUN/stdout.log.

    With jobs > 1 each child gets OMP_NUM_THREADS = cpu_count // jobs (unless the caller set it), so
    parallel CPU runs split the cores instead of fighting over them. Outcome lists keep plan order.
    """
    out = Outcome()
    todo = _queue(specs, runs_dir, launcher, out, dry_run)
    if dry_run or not todo:
        return out
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

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


def evaluate_checkpoints(
    scale: Scale, specs: list[RunSpec], runs_dir: Path, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Fig. 6: the inference evaluation of each main run's final checkpoint (in this process, on its device)."""
    from rlcm_exp.evaluation.suite import run_evaluation  # on use: planning and reporting need no torch

    results = []
    for spec in specs:
        if spec.kind != "main" or spec.seed not in seeds:
            continue
        run_dir = runs_dir / spec.name
        final = run_dir / "checkpoints" / "final"
        if not is_finished(run_dir):
            continue
        cached = run_dir / "eval" / "eval.json"
        if cached.is_file() and cached.stat().st_mtime > final.stat().st_mtime:
            results.append(json.loads(cached.read_text()))
            continue
        steps = ",".join(str(s) for s in scale.algos[spec.algo].eval_steps)
        overrides = [
            f"checkpoint={run_dir}",
            f"out={run_dir / 'eval'}",
            f"steps=[{steps}]",
            *scale.eval_overrides,
        ]
        print(f"[reproduce] evaluating {spec.name}: python -m rlcm_exp.evaluate {shlex.join(overrides)}")
        results.append(run_evaluation(compose("evaluate", overrides), overrides))
    return results

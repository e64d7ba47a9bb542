"""Running a scale (conf/reproduce/<scale>.yaml): each planned training run as a subprocess
(pipeline.run_all), the inference evaluation of the final checkpoints (Fig. 6) in this process, then
the report (`python -m rlcm_exp.reproduce` is the command)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlcm_exp.configs import compose
from rlcm_exp.reproduction import report
from rlcm_exp.reproduction.pipeline import Launch, pending_evaluations, run_stage
from rlcm_exp.reproduction.plan import (
    Outcome,
    RunSpec,
    Scale,
    estimate,
    eval_seeds,
    plan_runs,
    scale_dir,
)


@dataclass(frozen=True)
class Request:
    """One `python -m rlcm_exp.reproduce --scale S` invocation, parsed."""

    scale: Scale
    seeds: tuple[int, ...]  # training seeds
    figures: tuple[str, ...]  # which of FIGURES to produce
    thresholds: dict[str, float]  # --threshold values (win over the scale's)
    algos: tuple[str, ...]  # algorithms trained (each a key of the scale's algos)
    launch: Launch


def reproduce(req: Request) -> Outcome:
    """Plan, train what is unfinished, evaluate (Fig. 6) and write OUT/<scale>/report.md (not on a dry
    run); the outcome lists the failed runs."""
    folder = scale_dir(req.launch.out, req.scale)
    specs = plan_runs(req.scale, req.seeds, req.figures, req.launch.overrides, req.algos)
    seeds_6 = eval_seeds(req.scale, req.seeds)
    n_eval = sum(1 for s in specs if s.kind == "main" and s.seed in seeds_6) if "6" in req.figures else 0
    hours = estimate(specs, req.scale, n_eval, req.launch.jobs) / 3600
    plan_line = (
        f"{req.scale.name}: {len(specs)} training runs + {n_eval} checkpoint evaluations, "
        f"estimated {hours:.2f} h with {req.launch.jobs} job(s) when none has run yet"
    )

    def finish(outcome: Outcome, elapsed_s: float) -> Path:
        evals = evaluate_checkpoints(req.scale, specs, folder / "runs", seeds_6) if "6" in req.figures else []
        thresholds = req.scale.thresholds | req.thresholds
        return report.write_report(
            folder,
            req.scale,
            specs,
            outcome,
            evals,
            req.figures,
            thresholds,
            req.launch.invocation,
            elapsed_s,
        )

    return run_stage(specs, folder, req.launch, "reproduce", plan_line, finish)


def evaluate_checkpoints(
    scale: Scale, specs: list[RunSpec], runs_dir: Path, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Fig. 6: the inference evaluation of each main run's final checkpoint (in this process, on its
    device), into RUN/eval/eval.json."""
    from rlcm_exp.evaluation.suite import run_evaluation  # on use: planning and reporting need no torch

    chosen = [s for s in specs if s.kind == "main" and s.seed in seeds]
    paths, todo = pending_evaluations(
        chosen, runs_dir, "eval", lambda s: scale.algos[s.algo].eval_steps, scale.eval_overrides
    )
    for spec, overrides in todo:
        print(f"[reproduce] evaluating {spec.name}: python -m rlcm_exp.evaluate {shlex.join(overrides)}")
        run_evaluation(compose("evaluate", overrides), overrides)
    return [json.loads(p.read_text()) for p in paths if p.is_file()]

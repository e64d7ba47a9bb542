"""`python -m rlcm_exp.reproduce --scale full|toy|smoke`: the paper's comparisons, end to end.

Runs Fig. 4 (reward vs reward queries), Fig. 5 (reward vs GPU-hours), Fig. 6 (inference-time
budget) and Fig. 7 (horizon ablation) for every seed, each training run a subprocess
`python -m rlcm_exp ... hydra.run.dir=OUT/<scale>/runs/<name>`, then writes
OUT/<scale>/report.md with the figures, the time-to-threshold table and the exact commands.
Scales are data in conf/reproduce/<scale>.yaml; finished runs are skipped on a re-run.

Exit codes: 0 done, 1 a training run failed, 2 bad arguments or a bad scale file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rlcm_exp.errors import CONFIG_ERROR_EXIT_CODE, ConfigError
from rlcm_exp.reproduction.pipeline import Launch
from rlcm_exp.reproduction.plan import (
    FIGURES,
    Outcome,
    load_scale,
    parse_figures,
    parse_thresholds,
    scale_names,
)
from rlcm_exp.reproduction.scale_run import Request, reproduce
from rlcm_exp.reproduction.study import TUNE_SUFFIX, load_study, scale_is_study, study_names
from rlcm_exp.reproduction.study_run import StudyRequest, run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlcm_exp.reproduce", description=__doc__.splitlines()[0])
    studies = [n + suffix for n in study_names() for suffix in (TUNE_SUFFIX, "")]
    parser.add_argument(
        "--scale",
        choices=scale_names() + studies,
        default="full",
        help="full | smoke: the paper's runs; a study (conf/study/NAME.yaml): NAME-tune, then NAME",
    )
    parser.add_argument("--out", type=Path, default=Path("experiments/paper"), help="writes OUT/<scale>/")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the scale's)")
    parser.add_argument("--figures", default=",".join(FIGURES), help="which of 4,5,6,7 to produce")
    parser.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="TASK=VALUE",
        help="time-to-threshold reward per task (default: the scale's stated one, else the lower final seed-mean reward)",
    )
    parser.add_argument(
        "--launcher",
        default=f"{shlex.quote(sys.executable)} -m",
        help="what runs `-m rlcm_exp`, e.g. 'accelerate launch --multi_gpu --num_processes 4 -m'",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="appended to every training run, e.g. logger=wandb or model.lcm.local_path=/data/lcm",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once (CPU: each gets cpu_count // jobs threads; GPUs: use a launcher instead)",
    )
    parser.add_argument(
        "--algos",
        default=None,
        help="full and smoke: comma-separated algorithms to train, from the scale file's algos "
        "(default: its method and baseline)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and its time estimate; run nothing"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        figures = parse_figures(args.figures)
    except ValueError as err:
        parser.error(f"--figures: {err}")
    launch = Launch(
        out=args.out,
        launcher=tuple(shlex.split(args.launcher)),
        overrides=tuple(args.override),
        jobs=args.jobs,
        dry_run=args.dry_run,
        invocation="python -m rlcm_exp.reproduce " + shlex.join(argv if argv is not None else sys.argv[1:]),
    )
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None
    try:
        if scale_is_study(args.scale):
            outcome = _study(args.scale, seeds, launch)
        else:
            scale = load_scale(args.scale)
            algos = tuple(a.strip() for a in args.algos.split(",") if a.strip()) if args.algos else None
            request = Request(
                scale=scale,
                seeds=seeds or scale.seeds,
                figures=figures,
                thresholds=parse_thresholds(args.threshold),
                algos=algos or scale.compare,
                launch=launch,
            )
            outcome = reproduce(request)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    return 1 if outcome.failed else 0


def _study(scale: str, seeds: tuple[int, ...] | None, launch: Launch) -> Outcome:
    study = load_study(scale.removesuffix(TUNE_SUFFIX))
    request = StudyRequest(
        study=study, tune=scale.endswith(TUNE_SUFFIX), seeds=seeds or study.seeds, launch=launch
    )
    return run_study(request)


if __name__ == "__main__":
    sys.exit(main())

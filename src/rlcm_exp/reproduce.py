"""`python -m rlcm_exp.reproduce --scale full|toy|smoke`: the paper's comparisons, end to end.

Runs Fig. 4 (reward vs reward queries), Fig. 5 (reward vs GPU-hours), Fig. 6 (inference-time
budget) and Fig. 7 (horizon ablation) for every seed, each training run a subprocess
`python -m rlcm_exp ... hydra.run.dir=OUT/<scale>/runs/<name>`, then writes
OUT/<scale>/report.md with the figures, the time-to-threshold table and the exact commands.

Re-running is cheap: a run is finished when its metrics.jsonl has train.epochs records and
checkpoints/final exists; finished runs are skipped, unfinished ones re-run (resumed from their
newest complete checkpoint when they have one, else from scratch). Inference results are kept
in RUN/eval/eval.json and reused while the final checkpoint is older than them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlcm_exp import report

FIGURES = ("4", "5", "6", "7")


@dataclass(frozen=True)
class Scale:
    """What one scale runs. Sizes here are overrides of conf/; everything else is the config's."""

    name: str
    tasks: tuple[str, ...]  # task group options compared in Figs. 4-6
    seeds: tuple[int, ...]  # seeds of every training run
    common: tuple[str, ...]  # overrides of every training run
    algo_overrides: dict[str, tuple[str, ...]]  # extra overrides per algorithm (steps, epochs)
    horizon_task: str  # task of the Fig. 7 ablation
    horizon_steps: tuple[int, ...]  # extra RLCM horizons H trained for Fig. 7 (the main H is reused)
    eval_overrides: tuple[str, ...]  # conf/evaluate.yaml overrides of the inference evaluation
    eval_steps: dict[str, tuple[int, ...]]  # step counts timed and scored as full rollouts, per algorithm
    eval_seeds: tuple[int, ...]  # training seeds whose final checkpoints are evaluated for Fig. 6
    epoch_seconds: dict[
        str, float
    ]  # rough seconds per epoch per algorithm at its main H (plan estimate only)
    main_steps: dict[str, int]  # the main H per algorithm (plan estimate only; the config decides)
    startup_seconds: float  # rough per-run process start + model load (plan estimate only)
    eval_seconds: float  # rough seconds per evaluated checkpoint (plan estimate only)
    notes: str  # said in the report
    # extra overrides per "algo:task" pair, applied after the algorithm's
    pair_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # stated time-to-threshold reward per task (--threshold wins; default: the lower final mean)
    thresholds: dict[str, float] = field(default_factory=dict)


SMALL = (  # tests/test_cli.py's fast tiny sizes
    "model=tiny",
    "train.samples_per_epoch=16",
    "train.sample_batch_size=8",
    "train.train_batch_size=4",
    "train.samples_per_step=8",
    "train.save_images=4",
)

SCALES: dict[str, Scale] = {
    "smoke": Scale(
        name="smoke",
        tasks=("compression",),
        seeds=(0, 1),
        common=(*SMALL, "train.epochs=2"),
        algo_overrides={"rlcm": ("sampler.num_steps=4",), "ddpo": ("sampler.num_steps=5",)},
        horizon_task="compression",
        horizon_steps=(2,),
        eval_overrides=("eval_seeds=2", "batch_size=8", "timing_repeats=1", "budget_points=3"),
        eval_steps={"rlcm": (2, 4), "ddpo": (2, 5)},
        eval_seeds=(0, 1),
        epoch_seconds={"rlcm": 0.5, "ddpo": 1.0},
        main_steps={"rlcm": 4, "ddpo": 5},
        startup_seconds=8.0,
        eval_seconds=3.0,
        notes="Random tiny models (32 px): checks the pipeline, not the paper's numbers. 2 epochs x 16 samples.",
    ),
    "toy": Scale(
        name="toy",
        tasks=("toy_compression", "toy_alignment"),
        seeds=(0, 1, 2),
        common=(  # the quickstart's batch arithmetic, LoRA and PPO settings, for both algorithms
            "model=toy",
            "train.samples_per_epoch=96",
            "train.sample_batch_size=48",
            "train.train_batch_size=16",
            "train.samples_per_step=16",
            "optimizer.lr=1e-3",
            "algo.ppo.clip_range=1e-3",
            "algo.lora.rank=8",
            "algo.lora.alpha=8",
            "algo.stat_tracker.buffer_size=32",
            "algo.stat_tracker.min_count=4",
        ),
        algo_overrides={
            "rlcm": ("sampler.num_steps=4", "train.epochs=40"),
            "ddpo": ("sampler.num_steps=20", "algo.timestep_fraction=0.25", "train.epochs=32"),
        },
        pair_overrides={  # the alignment test's LR, for both algorithms; RLCM gets 60 epochs
            "rlcm:toy_alignment": ("optimizer.lr=2e-3", "train.epochs=60"),
            "ddpo:toy_alignment": ("optimizer.lr=2e-3",),
            # DDPO's compression CI test (tests/test_learning.py), the fastest DDPO setting found:
            # with the paper's CFG 5 and any transition trained it cut the JPEG size by ~1.5% here
            "ddpo:toy_compression": (
                "sampler.num_steps=10",
                "sampler.guidance_scale=1.0",
                "algo.timestep_fraction=0.5",
                "algo.timestep_window=0.5",
                "optimizer.lr=2e-3",
                "train.samples_per_epoch=64",
                "train.sample_batch_size=32",
                "train.epochs=45",
            ),
        },
        # 0.92 kB JPEG: under both starting points (LCM-4 ~1.09 kB; DDIM-10 without CFG ~1.01 kB, so
        # 10% under the LCM's start would be only 2% under DDPO's); alignment keeps the default
        thresholds={"toy_compression": -0.92},
        horizon_task="toy_compression",
        horizon_steps=(2, 8),
        eval_overrides=("eval_seeds=8", "batch_size=24", "timing_repeats=2", "budget_points=5"),
        eval_steps={"rlcm": (2, 4, 8), "ddpo": (5, 10, 20)},
        eval_seeds=(0,),
        epoch_seconds={"rlcm": 3.5, "ddpo": 11.0},
        main_steps={"rlcm": 4, "ddpo": 20},
        startup_seconds=10.0,
        eval_seconds=45.0,
        notes=(
            "The toy world on a 2-core CPU, two runs at a time (one core, one thread each), sized to finish "
            "in under 45 minutes. Both algorithms run the same hyperparameters, the quickstart's RLCM "
            "settings: 96 trajectories per epoch, 16 per optimizer step, LoRA rank 8, clip 1e-3, per-prompt "
            "stat tracker (buffer 32, min count 4), LR 1e-3 (toy_alignment: 2e-3). They differ in the sampler "
            "and the budget: RLCM samples 4 LCM steps for 40 epochs (toy_alignment: 60). On toy_alignment DDPO "
            "samples 20 DDIM steps (eta 1, CFG 5; the paper's 50 would cost 2.5x more), trains 5 of the 20 "
            "transitions of each trajectory (timestep_fraction 0.25) and runs 32 epochs, about twice RLCM's "
            "wall-clock. On toy_compression DDPO runs its CI learning test's settings, the fastest found: 10 "
            "DDIM steps with CFG off, 5 of the first 5 transitions trained (timestep_window 0.5), LR 2e-3, 64 "
            "trajectories per epoch for 45 epochs; with the paper's CFG 5 and any transition trained (20 steps, "
            "32 epochs, the report of commit 393093f) it ended at 1.08 kB, never reaching the threshold. "
            "Fig. 6 evaluates seed 0's final checkpoints on the 9 held-out compositions x 8 seeds. Times "
            "are wall-clock on this CPU: other load shows up as training time."
        ),
    ),
    "full": Scale(
        name="full",
        tasks=("compression", "incompression", "aesthetic", "prompt_alignment"),
        seeds=(0, 1, 2),
        common=("model=dreamshaper_v7",),  # the paper's (algo, task) hyperparameters come from conf/paper/
        algo_overrides={"rlcm": (), "ddpo": ()},
        horizon_task="aesthetic",
        horizon_steps=(2, 4),
        eval_overrides=("eval_seeds=25", "batch_size=8", "timing_repeats=3", "budget_points=6"),
        eval_steps={"rlcm": (2, 4, 8), "ddpo": (10, 25, 50)},
        eval_seeds=(0, 1, 2),
        epoch_seconds={"rlcm": 250.0, "ddpo": 560.0},  # paper Fig. 5, 4 GPUs
        main_steps={"rlcm": 8, "ddpo": 50},
        startup_seconds=120.0,
        eval_seconds=1800.0,
        notes=(
            "The paper's setting: LCM-Dreamshaper-v7 (RLCM) and Dreamshaper-7 (DDPO) with the reference "
            "hyperparameters of conf/paper/ (sizes are global, so any GPU count runs the same algorithm); "
            "the paper used 4 x 48 GB GPUs per run. Fig. 6: 4 unseen prompts x 25 seeds = 100 trajectories "
            "per budget, on the device running this driver."
        ),
    ),
}


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
    scale: Scale, seeds: tuple[int, ...], figures: tuple[str, ...], user: tuple[str, ...] = ()
) -> list[RunSpec]:
    """The training runs the chosen figures need; Fig. 7 reuses the main RLCM run as its main H."""
    specs = []
    # Fig. 7 alone still needs its task's main runs: its main H and the DDPO reference
    tasks = scale.tasks if {"4", "5", "6"} & set(figures) else (scale.horizon_task,) if "7" in figures else ()
    for task in tasks:
        for algo in ("rlcm", "ddpo"):
            for seed in seeds:
                specs.append(_spec(scale, "main", task, algo, seed, (), user))
    if "7" in figures:
        for steps in scale.horizon_steps:
            for seed in seeds:
                specs.append(
                    _spec(
                        scale,
                        "horizon",
                        scale.horizon_task,
                        "rlcm",
                        seed,
                        (f"sampler.num_steps={steps}",),
                        user,
                    )
                )
    return specs


def _last_int(overrides: tuple[str, ...], key: str, default: int) -> int:
    """The value the last `key=N` override sets (the one Hydra keeps), or `default`."""
    return next((int(o.split("=", 1)[1]) for o in overrides[::-1] if o.startswith(f"{key}=")), default)


def _spec(
    scale: Scale,
    kind: str,
    task: str,
    algo: str,
    seed: int,
    extra: tuple[str, ...],
    user: tuple[str, ...] = (),
) -> RunSpec:
    overrides = (
        f"algo={algo}",
        f"task={task}",
        f"seed={seed}",
        *scale.common,
        *scale.algo_overrides[algo],
        *scale.pair_overrides.get(f"{algo}:{task}", ()),
        *extra,
        # wandb grouping (ignored by logger=none): one group per scale and task, as the paper's figures
        f"++logger.group=reproduce_{scale.name}_{task}",
        f"++logger.tags=[reproduce,{scale.name},{algo},{kind}]",
        *user,  # --override: last, so they win
    )
    steps = _last_int(extra, "sampler.num_steps", 0) or None  # set only by the horizon runs
    name = f"{task}_{algo}" + (f"_h{steps}" if steps is not None else "") + f"_s{seed}"
    epochs = _last_int(overrides, "train.epochs", 100)
    # epoch_seconds is at the main H and the common batch; scale by this run's steps and batch
    run_steps = _last_int(overrides, "sampler.num_steps", scale.main_steps[algo])
    batch, common_batch = (
        _last_int(overrides, "train.samples_per_epoch", 1),
        _last_int(scale.common, "train.samples_per_epoch", 1),
    )
    per_epoch = scale.epoch_seconds[algo] * run_steps / scale.main_steps[algo] * batch / common_batch
    return RunSpec(name, kind, task, algo, seed, overrides, scale.startup_seconds + epochs * per_epoch)


def is_finished(run_dir: Path) -> bool:
    """metrics.jsonl holds train.epochs records and checkpoints/final exists."""
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        return False
    return report.load_run(run_dir).finished


def has_resumable_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("epoch_*/COMPLETE"))


def train_command(spec: RunSpec, run_dir: Path, launcher: list[str]) -> list[str]:
    return [*launcher, "rlcm_exp", *spec.overrides, f"hydra.run.dir={run_dir}"]


@dataclass
class Outcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def run_all(
    specs: list[RunSpec], runs_dir: Path, launcher: list[str], dry_run: bool = False, jobs: int = 1
) -> Outcome:
    """Each unfinished run as a subprocess, `jobs` at a time; output goes to RUN/stdout.log.

    With jobs > 1 each child gets OMP_NUM_THREADS = cpu_count // jobs (unless the caller set it), so
    parallel CPU runs split the cores instead of fighting over them. Outcome lists keep plan order.
    """
    out = Outcome()
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


def evaluate_checkpoints(
    scale: Scale, specs: list[RunSpec], runs_dir: Path, seeds: tuple[int, ...]
) -> list[dict[str, Any]]:
    """Fig. 6: the inference evaluation of each main run's final checkpoint (in this process, on its device)."""
    import json

    from hydra import compose, initialize_config_dir

    from rlcm_exp.evaluate import CONF_DIR, run_evaluation

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
        steps = ",".join(str(s) for s in scale.eval_steps[spec.algo])
        overrides = [
            f"checkpoint={run_dir}",
            f"out={run_dir / 'eval'}",
            f"steps=[{steps}]",
            *scale.eval_overrides,
        ]
        print(f"[reproduce] evaluating {spec.name}: python -m rlcm_exp.evaluate {shlex.join(overrides)}")
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("evaluate", overrides=overrides)
        results.append(run_evaluation(cfg, overrides))
    return results


def estimate(specs: list[RunSpec], scale: Scale, eval_count: int, jobs: int = 1) -> float:
    """Plan seconds: training runs spread over `jobs` workers, then the evaluations one by one."""
    return sum(s.est_seconds for s in specs) / max(1, jobs) + eval_count * scale.eval_seconds


def write_report(
    scale_dir: Path,
    scale: Scale,
    specs: list[RunSpec],
    outcome: Outcome,
    evals: list[dict[str, Any]],
    figures: tuple[str, ...],
    thresholds: dict[str, float],
    invocation: str,
    elapsed_s: float,
) -> Path:
    """report.md (+ report.json and the PNGs) from the finished runs' metrics files."""
    from rlcm_exp.__main__ import git_commit
    from rlcm_exp.evaluate import software_versions

    runs_dir = scale_dir / "runs"
    wanted = {s.name: s for s in specs}
    runs = [r for r in report.find_runs(runs_dir) if r.path.name in wanted and r.finished]
    main = [r for r in runs if wanted[r.path.name].kind == "main"]
    lines = [
        f"# RLCM vs DDPO, {scale.name} scale",
        "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `{invocation}` in {elapsed_s:.0f} s "
        f"({len(outcome.ran)} runs trained, {len(outcome.skipped)} already finished, {len(outcome.failed)} failed).",
        "",
        scale.notes,
        "",
    ]
    if outcome.failed:
        lines += [f"**Failed runs** (see RUN/stdout.log): {', '.join(outcome.failed)}", ""]
    table: list[dict[str, Any]] = []
    phases = report.phase_table(runs)
    if main and {"4", "5"} & set(figures):
        tasks = [t for t in scale.tasks if any(r.task == t for r in main)]
        if "4" in figures:
            report.training_figure(
                main,
                "reward_queries",
                scale_dir / "fig4_reward_vs_queries.png",
                "Fig. 4: reward vs reward queries (mean +- std over seeds)",
                tasks,
            )
            lines += ["## Fig. 4: sample complexity", "", "![fig4](fig4_reward_vs_queries.png)", ""]
        if "5" in figures:
            report.training_figure(
                main,
                "gpu_hours",
                scale_dir / "fig5_reward_vs_gpu_hours.png",
                "Fig. 5: reward vs GPU-hours (mean +- std over seeds)",
                tasks,
            )
            lines += ["## Fig. 5: training time", "", "![fig5](fig5_reward_vs_gpu_hours.png)", ""]
        table = report.threshold_table(main, thresholds=thresholds)
        lines += [
            "## Time to threshold",
            "",
            "Threshold per task: "
            + ", ".join(
                f"{task} {report.fmt(th)} ({source})"
                for task, (th, source) in {
                    r["task"]: (r["threshold"], r["threshold_source"]) for r in table
                }.items()
            )
            + ". Time to threshold is the first epoch at which the seed-mean reward reaches it, read on the "
            "seed-mean time axis; speed-up = DDPO's time / RLCM's time (paper: 17x on aesthetic in GPU-hours).",
            "",
            report.threshold_markdown(table),
            "## Seconds per epoch",
            "",
            "Mean over every epoch of every seed, from metrics.jsonl. Reward scoring runs in a worker thread "
            "while the next batch samples, so sampling + reward + training can exceed the epoch's wall-clock. "
            "The last column compares wall-clock per sampled trajectory (the batches may differ).",
            "",
            report.phase_markdown(phases),
        ]
    rollout: list[dict[str, Any]] = []
    if evals and "6" in figures:
        report.inference_figure(
            evals,
            scale_dir / "fig6_inference_budget.png",
            "Fig. 6: reward vs inference seconds per image (final checkpoints)",
        )
        rollout = report.rollout_table(evals)
        lines += [
            "## Fig. 6: inference-time budget",
            "",
            "Solid: the paper's protocol, a time budget per image (the sampler stops before a step that would "
            "overrun it and decodes its current estimate: the last LCM `denoised`, or DDIM's predicted x0 of the "
            "last step taken), measured on this device. Dashed: full rollouts at fewer steps, at their measured "
            f"seconds per image. Device: {evals[0]['device']}.",
            "",
            "![fig6](fig6_inference_budget.png)",
            "",
            report.rollout_markdown(rollout),
        ]
    if "7" in figures:
        horizon = [r for r in runs if r.task == scale.horizon_task]
        if horizon:
            report.training_figure(
                horizon,
                "gpu_hours",
                scale_dir / "fig7_horizon.png",
                f"Fig. 7: RLCM horizon ablation on {scale.horizon_task} (DDPO for reference)",
                [scale.horizon_task],
            )
            lines += ["## Fig. 7: horizon ablation", "", "![fig7](fig7_horizon.png)", ""]
    versions = software_versions()
    lines += [
        "## How this was made",
        "",
        f"Driver: `{invocation}`",
        "",
        f"Code: git commit {git_commit()}",
        "",
        "Training runs (one subprocess each, in this order; finished ones are skipped on a re-run; "
        "paths relative to the directory the driver ran in):",
        "",
        "```",
        *(c.replace(f"{Path.cwd()}/", "") for c in outcome.commands),
        "```",
        "",
        "Software: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    path = scale_dir / "report.md"
    path.write_text("\n".join(lines))
    report.write_json(
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


def parse_thresholds(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        task, _, value = item.partition("=")
        out[task] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcm_exp.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full | toy | smoke")
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
        "--dry-run", action="store_true", help="print the plan and its time estimate; run nothing"
    )
    args = parser.parse_args(argv)

    scale = SCALES[args.scale]
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else scale.seeds
    figures = tuple(f.strip() for f in args.figures.split(",") if f.strip())
    if bad := set(figures) - set(FIGURES):
        parser.error(f"--figures: unknown {sorted(bad)}; choose from {','.join(FIGURES)}")
    scale_dir = (args.out / scale.name).resolve()
    runs_dir = scale_dir / "runs"
    specs = plan_runs(scale, seeds, figures, tuple(args.override))
    eval_seeds = tuple(s for s in scale.eval_seeds if s in seeds) or seeds[:1]
    n_eval = sum(1 for s in specs if s.kind == "main" and s.seed in eval_seeds) if "6" in figures else 0
    print(
        f"[reproduce] {scale.name}: {len(specs)} training runs + {n_eval} checkpoint evaluations, "
        f"estimated {estimate(specs, scale, n_eval, args.jobs) / 3600:.2f} h with {args.jobs} job(s) when none has run yet"
    )
    invocation = "python -m rlcm_exp.reproduce " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    outcome = run_all(specs, runs_dir, shlex.split(args.launcher), dry_run=args.dry_run, jobs=args.jobs)
    if args.dry_run:
        return 0
    evals = evaluate_checkpoints(scale, specs, runs_dir, eval_seeds) if "6" in figures else []
    path = write_report(
        scale_dir,
        scale,
        specs,
        outcome,
        evals,
        figures,
        scale.thresholds | parse_thresholds(args.threshold),
        invocation,
        time.perf_counter() - start,
    )
    print(f"[reproduce] wrote {path}")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())

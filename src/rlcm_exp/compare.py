"""`python -m rlcm_exp.compare SWEEP_DIR [--out FILE.png] [--metric KEY] [--threshold X]`: every run of
a sweep side by side; `python -m rlcm_exp.compare --prompts SET RUN_DIR ...`: their reward tables.

Reads each subfolder holding metrics.jsonl + config.yaml (e.g. a Hydra multirun folder), draws the
metric against GPU-hours and against reward queries, one line per run, into one PNG, and writes
next to it a results table, FILE.md and FILE.csv: per run the final and best value, the held-out
reward before and after (eval.jsonl), wall-clock and reward queries in all and to the threshold, and
the config values that differ between the runs; per group of seeds their mean. The threshold is
--threshold, else the lowest final seed-mean over the groups. Local files only: no wandb.

With --prompts SET: the standard evaluation's tables (`python -m rlcm_exp.evaluate checkpoint=RUN
prompts=SET` writes RUN/eval/rewards_SET.json) of every run given (run dirs, evaluation folders, table
files, or folders of runs), one row per run with each reward's mean +- std over seeds, into
FILE.md and FILE.csv (default: the first folder's compare_SET.md).
Exit codes: 0 written, 2 no run folders (or tables) there, an unknown --metric (the known ones are
listed), or bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlcm_exp.analysis.figures import compare_figure
from rlcm_exp.analysis.runs import find_runs
from rlcm_exp.analysis.sweep import check_metric, write_sweep_tables
from rlcm_exp.configs import probe_folder
from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.tables import compare_tables, find_tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rlcm_exp.compare", description=__doc__.splitlines()[0].strip("`")
    )
    parser.add_argument(
        "sweep_dir",
        type=Path,
        nargs="+",
        help="folder whose subfolders are runs (metrics.jsonl + config.yaml); with --prompts, any number "
        "of run dirs, evaluation folders, rewards_SET.json tables or folders of runs",
    )
    parser.add_argument(
        "--prompts",
        default=None,
        help="compare the runs' reward tables on this prompt set (written by `rlcm_exp.evaluate prompts=SET`)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG to write (default SWEEP_DIR/compare.png); the tables "
        "go next to it with the same name (.md, .csv)",
    )
    parser.add_argument(
        "--metric", default="reward_mean", help="metrics.jsonl key on the y-axis and in the table"
    )
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="value of the metric to reach (default: the lowest final seed-mean over the groups of seeds)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.prompts is not None:
        return compare_reward_tables(args.sweep_dir, args.prompts, args.out)
    if len(args.sweep_dir) > 1:
        parser.error("give one SWEEP_DIR (several folders: only with --prompts)")
    args.sweep_dir = args.sweep_dir[0]
    try:
        runs = [r for r in find_runs(args.sweep_dir) if r.records]  # a damaged file: named, one line
        if not runs:
            raise FileNotFoundError(
                f"no run folders (metrics.jsonl + config.yaml with at least one epoch) under {args.sweep_dir}"
            )
        check_metric(runs, args.metric)  # before drawing: an unknown key would draw an empty plot
        target = args.out if args.out is not None else args.sweep_dir / "compare.png"
        probe_folder(target.parent, f"--out {target}")  # a read-only folder: one line, before drawing
        out = compare_figure(args.sweep_dir, args.out, args.metric)
        tables = write_sweep_tables(runs, args.sweep_dir, out, args.metric, args.threshold)
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}, {tables[0]}, {tables[1]}")
    return 0


def compare_reward_tables(paths: list[Path], label: str, out: Path | None) -> int:
    """The reward tables of `paths` on the prompt set `label`, one row per run (evaluation/tables.py)."""
    try:
        tables = find_tables(paths, label)
        target = out if out is not None else paths[0] / f"compare_{label}.md"
        probe_folder(target.parent, f"--out {target}")
        written = compare_tables(tables, target)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written[0].read_text(), end="")
    print(f"wrote {written[0]}, {written[1]} ({len(tables)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m rlcm_exp.compare SWEEP_DIR [--out FILE.png]`: every run of a sweep side by side.

Reads each subfolder holding metrics.jsonl + config.yaml (e.g. a Hydra multirun folder) and draws
reward against GPU-hours and against reward queries, one line per run, into one PNG. Local files
only: no wandb. Exit codes: 0 written, 2 no run folders there (or bad arguments).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlcm_exp.analysis.figures import compare_figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcm_exp.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", type=Path, help="folder whose subfolders are runs (metrics.jsonl + config.yaml)"
    )
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default SWEEP_DIR/compare.png)")
    parser.add_argument("--metric", default="reward_mean", help="metrics.jsonl key on the y-axis")
    args = parser.parse_args(argv)
    try:
        out = compare_figure(args.sweep_dir, args.out, args.metric)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

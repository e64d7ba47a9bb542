"""`python -m rlcm_exp.compare SWEEP_DIR [--out FILE.png]`: every run of a sweep side by side.

Reads each subfolder holding metrics.jsonl + config.yaml (e.g. a Hydra multirun folder) and draws
reward against GPU-hours and against reward queries, one line per run, into one PNG. Local files
only: no wandb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlcm_exp.report import AXIS_LABELS, Run, find_runs

AXES = ("gpu_hours", "reward_queries")  # the two panels, left to right


def run_labels(runs: list[Run], max_keys: int = 4) -> list[str]:
    """Name each run by the config values that differ between the runs (paths left out), e.g.
    "algo.name=ddpo, seed=1"; the folder name when nothing differs."""
    keys = sorted({k for r in runs for k in r.flat_config})
    differ = [
        k
        for k in keys
        if len({repr(r.flat_config.get(k)) for r in runs}) > 1
        and not any(isinstance(r.flat_config.get(k), str) and "/" in r.flat_config[k] for r in runs)
    ]
    # a group choice changes many keys; its name is enough (algo.name rather than every PPO constant)
    named = [k for k in differ if k.endswith(".name") or "." not in k or k.startswith("sampler.num_steps")]
    shown = (named or differ)[:max_keys]
    if not shown:
        return [r.path.name for r in runs]
    return [", ".join(f"{k}={r.flat_config.get(k)}" for k in shown) for r in runs]


def compare(sweep_dir: Path, out: Path | None = None, metric: str = "reward_mean") -> Path:
    """Draw every run under `sweep_dir` into one PNG (default SWEEP_DIR/compare.png); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    runs = [r for r in find_runs(sweep_dir) if r.records]
    if not runs:
        raise FileNotFoundError(
            f"no run folders (metrics.jsonl + config.yaml with at least one epoch) under {sweep_dir}"
        )
    labels = run_labels(runs)
    fig, axes = plt.subplots(1, len(AXES), figsize=(6 * len(AXES), 4.5 + 0.2 * len(runs)))
    for ax, x_key in zip(axes, AXES, strict=True):
        for run, label in zip(runs, labels, strict=True):
            xs = [rec[x_key] for rec in run.records]
            ys = [rec.get(metric, float("nan")) for rec in run.records]
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel(AXIS_LABELS.get(x_key, x_key))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    # one legend under both panels: labels can be long
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=1 if len(runs) > 6 else 2, fontsize=7)
    fig.suptitle(f"{sweep_dir} ({len(runs)} runs)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(runs) + 1) // 2 if len(runs) <= 6 else len(runs)), 1, 1))
    out = Path(out) if out else sweep_dir / "compare.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlcm_exp.compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sweep_dir", type=Path, help="folder whose subfolders are runs (metrics.jsonl + config.yaml)"
    )
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default SWEEP_DIR/compare.png)")
    parser.add_argument("--metric", default="reward_mean", help="metrics.jsonl key on the y-axis")
    args = parser.parse_args(argv)
    try:
        out = compare(args.sweep_dir, args.out, args.metric)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

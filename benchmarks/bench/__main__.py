"""`python -m benchmarks.bench`: argument parsing and exit codes; the work is in the package modules."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import benchmarks.bench as package
from benchmarks.bench.scales import ALGOS, SCALES, toy_weights_missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=(package.__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--scale", choices=sorted(SCALES), default="toy")
    ap.add_argument(
        "--repeats", type=int, default=3, help="measured epochs per algorithm (after the warm-up)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured epochs first (default: the scale's)")
    ap.add_argument("--algos", default="rlcm,ddpo", help="comma-separated subset of rlcm,ddpo")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--readme", default=None, help="also write the table into this README between markers")
    ap.add_argument("--full-downscale", type=int, default=4, help="CPU only: full-scale resolution divisor")
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="a Hydra override applied to every algorithm (repeatable), e.g. --set sampler.num_steps=4",
    )
    ap.add_argument(
        "--compare-transitions-per-forward",
        action="store_true",
        help="also replay each algorithm's last training phase with one and with all trained transitions "
        "per UNet call (train.transitions_per_forward=1 vs 0), --repeats times each, with peak memory",
    )
    ap.add_argument("--only", choices=ALGOS, help=argparse.SUPPRESS)  # child mode: one algorithm
    ap.add_argument("--raw-out", help=argparse.SUPPRESS)
    ap.add_argument("--full-dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _child(args: argparse.Namespace) -> int:
    from benchmarks.bench.run import run_algo
    from benchmarks.bench.scales import run_spec

    spec = run_spec(
        args.scale,
        args.only,
        args.repeats,
        args.warmup,
        args.extra,
        args.full_dir,
        args.full_downscale,
        compare=args.compare_transitions_per_forward,
    )
    raw = run_algo(args.only, spec)
    Path(args.raw_out).write_text(json.dumps(raw))
    return 0


def _usage_error(args: argparse.Namespace, algos: list[str]) -> str | None:
    if unknown := sorted(set(algos) - set(ALGOS)):
        return f"--algos: unknown {unknown}; choose from {list(ALGOS)}"
    if args.repeats < 1:
        return "--repeats must be at least 1"
    if (weights := toy_weights_missing(args.scale, args.extra)) is not None:
        return (
            f"--scale toy needs the toy weights in {weights} (lcm/ and diffusion/); build them "
            "with `make toy-model`, or run --scale tiny."
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only:
        return _child(args)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if (error := _usage_error(args, algos)) is not None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from benchmarks.bench.environment import environment
    from benchmarks.bench.report import build_report, write_report
    from benchmarks.bench.run import run_children

    # a SIGTERM unwinds like an exception, so the GBs of full-scale scratch weights are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    header: dict[str, Any] = {
        "scale": args.scale,
        "repeats": args.repeats,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),  # before any model runs: the load average says whether the CPU was free
    }
    started = time.perf_counter()
    raws, code = run_children(args, algos)
    if code != 0:
        return code
    report = build_report(header, raws)
    report["bench_wall_s"] = time.perf_counter() - started
    stem, table = write_report(report, Path(args.out), Path(args.readme) if args.readme else None)
    print(table)
    print(f"[bench] wrote {stem}.json and .md in {report['bench_wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

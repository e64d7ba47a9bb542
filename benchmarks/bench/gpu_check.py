"""`python -m benchmarks.bench.gpu_check`: full-size RLCM and DDPO rounds per paper task on one GPU.

    python -m benchmarks.bench.gpu_check [--budget-s 540] [--tasks aesthetic,...] [--out benchmarks/results]
    python -m benchmarks.bench.gpu_check --cpu-scale --out /tmp/x      # the same path on a CPU, seconds

Builds SD-1.5-sized members (LCM-Dreamshaper-v7 and Dreamshaper-7 shapes: UNet, VAE, text encoder),
full-size SD3.5-Medium and SD3.5-Large(-Turbo) members for the flow rows (gpu_plan.FLOW_ROUNDS: a
Flow-GRPO round and a few-step round), and the aesthetic reward's CLIP ViT-L/14 + LAION MLP head
with random weights in the hub layout,
then runs, for each paper task's per-GPU settings (gpu_plan.py), one short RLCM and DDPO round
through the production `rlcm_exp.training.build.train` (fp16 weights, fp32 LoRA, SDPA attention),
in each variant of gradient checkpointing x transitions per UNet call, each in its own process
(its own peak memory; an out-of-memory variant is recorded, not fatal; a child past --run-timeout-s
is killed and recorded; a variant the memory model, rlcm_exp/models/memory.py, says cannot fit is
skipped with its reason). Runs are ordered so that the most useful come first; once `--budget-s` would
be exceeded the rest are recorded as skipped. Writes OUT/gpu-{device}.json and .md (gpu_report.py;
format in benchmarks/README.md) after every run, so a check cut short keeps what it measured. Each row
carries the round's correctness monitors (ratio_first_max_dev, the first loss call's clipfrac). No
downloads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bench.gpu_plan import (
    TASKS,
    VARIANTS,
    FlowSettings,
    TaskSettings,
    Variant,
    flow_overrides,
    flow_settings,
    memory_refusal,
    paper_settings,
    run_overrides,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench.gpu_check", description=(__doc__ or "").split("\n\n")[0]
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated paper tasks")
    ap.add_argument(
        "--variants",
        type=int,
        default=None,
        help=f"how many of the variants, in order (default {len(VARIANTS)}; 2 on a CPU)",
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="no run starts that would end after this")
    ap.add_argument(
        "--run-timeout-s",
        type=float,
        default=180.0,
        help="a child run is killed after this (or when the budget ends, whichever is first)",
    )
    ap.add_argument(
        "--warmup", type=int, default=None, help="unmeasured rounds first (default 1; 0 on a CPU)"
    )
    ap.add_argument("--cpu-scale", action="store_true", help="small members, one task, tiny batches (CPU)")
    ap.add_argument("--work-dir", default=None, help="where the random members are written (default: temp)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # JSON of one run: child mode
    ap.add_argument("--raw-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _child(spec: dict[str, Any], raw_out: Path) -> int:
    from benchmarks.bench.run import run_algo
    from benchmarks.bench.scales import RunSpec

    raw = run_algo(spec["algo"], RunSpec(spec["overrides"], spec["warmup"], [], floor=False))
    raw_out.write_text(json.dumps(raw))
    return 0


def _run_one(spec: dict[str, Any], in_process: bool, tmp: Path, timeout_s: float) -> dict[str, Any]:
    """One run's raw measurements, or {"status": "failed" | "timeout", "error": ...}; a child still
    running after `timeout_s` is killed (the in-process CPU scale has no timeout)."""
    raw_out = tmp / "raw.json"
    raw_out.unlink(missing_ok=True)
    if in_process:
        _child(spec, raw_out)
        return json.loads(raw_out.read_text())
    from benchmarks.bench.run import REPO, _child_env

    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench.gpu_check",
        "--child",
        json.dumps(spec),
        "--raw-out",
        str(raw_out),
    ]
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=max(timeout_s, 1.0)
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout_s:.0f} s (--run-timeout-s)"}
    if proc.returncode != 0 or not raw_out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        error = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        return {"status": "failed", "exit": proc.returncode, "error": error[:500]}
    return json.loads(raw_out.read_text())


def plan_runs(
    tasks: list[str], variants: list[Variant], cpu_scale: bool
) -> list[tuple[TaskSettings, Variant]]:
    """Every task's default variant first (both algorithms), then the other variants task by task."""
    order = [(t, variants[0]) for t in tasks] + [(t, v) for t in tasks for v in variants[1:]]
    return [(paper_settings(algo, t, cpu_scale), v) for t, v in order for algo in ("rlcm", "ddpo")]


def build_members(root: Path, cpu_scale: bool, cuda: bool) -> tuple[dict[str, Path], list[str]]:
    """The random members (lcm, diffusion) and the aesthetic reward's overrides."""
    from benchmarks.bench.full_models import build_aesthetic_reward, build_full_member

    device = "cuda" if cuda else "cpu"
    members = {
        kind: build_full_member(root, kind, small=cpu_scale, device=device) for kind in ("lcm", "diffusion")
    }
    return members | build_flow_members(root, cpu_scale, device), build_aesthetic_reward(
        root, small=cpu_scale, device=device
    )


def build_flow_members(root: Path, cpu_scale: bool, device: str) -> dict[str, Path]:
    """The flow rows' random members by architecture: full-size SD3.5-Medium and SD3.5-Large(-Turbo)
    transformers (text encoders shared); at --cpu-scale the tiny SD3.5 family's two members."""
    from benchmarks.bench.full_models import SD35_TRANSFORMERS, build_full_sd3_member

    if cpu_scale:
        from rlcm_exp.models.synthetic import build_tiny_sd35_folders

        tiny = build_tiny_sd35_folders(root / "tiny_sd35")
        return {"sd35_medium": tiny / "diffusion", "sd35_large": tiny / "lcm"}
    return {arch: build_full_sd3_member(root, arch, device=device) for arch in SD35_TRANSFORMERS}


def run_all(
    args: argparse.Namespace, cuda: bool, written: Callable[[list[dict[str, Any]], float], None]
) -> tuple[list[dict[str, Any]], float]:
    """Build the members, then each planned run within the budget; (records, seconds spent building).
    `written(records, build_s)` is called after every run: the report on disk is never more than one
    run behind (a check killed by its machine's time limit keeps what it measured)."""
    from benchmarks.bench.gpu_plan import MEMBER

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()][: 1 if args.cpu_scale else None]
    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    started = time.perf_counter()
    records: list[dict[str, Any]] = []
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        members, reward = build_members(root, args.cpu_scale, cuda)
        build_s = time.perf_counter() - started
        print(f"[gpu-check] members built in {build_s:.0f} s", flush=True)
        last: dict[str, float] = {}  # the last run's seconds per algorithm: the next one's estimate
        variants = list(VARIANTS[: args.variants or (2 if args.cpu_scale else None)])
        planned = plan_runs(tasks, variants, args.cpu_scale)
        # the flow rows (issue 28) in the default variant, after every task's default VP rows
        planned[2 * len(tasks) : 2 * len(tasks)] = [(f, variants[0]) for f in flow_settings(args.cpu_scale)]
        for settings, variant in planned:
            record = {"settings": settings.as_dict(), "variant": dataclasses_dict(variant)}
            elapsed = time.perf_counter() - started
            if elapsed + last.get(settings.algo, 0.0) > args.budget_s:
                records.append({**record, "status": "skipped", "error": f"budget {args.budget_s:.0f} s"})
                continue
            if isinstance(settings, FlowSettings):
                member = members[settings.architecture]
                overrides = flow_overrides(settings, variant, member, cuda, warmup)
            else:
                member = members[MEMBER[settings.algo]]
                overrides = run_overrides(settings, variant, member, reward, cuda, warmup)
            spec = {"algo": settings.algo, "warmup": warmup, "overrides": overrides}
            why = memory_refusal(overrides, device_memory(cuda))  # certain OOM: not run
            if why is not None:
                records.append({**record, "status": "skipped", "error": f"memory model: {why}"})
                written(records, build_s)
                continue
            print(f"[gpu-check] {settings.task} {settings.algo} {variant.name}", flush=True)
            t0 = time.perf_counter()
            timeout = min(args.run_timeout_s, args.budget_s - elapsed)
            raw = _run_one(spec, in_process=not cuda, tmp=root, timeout_s=timeout)
            last[settings.algo] = time.perf_counter() - t0
            records.append({**record, "status": raw.pop("status", "ok"), "run_s": last[settings.algo], **raw})
            written(records, build_s)
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return records, build_s


def device_memory(cuda: bool) -> float:
    """The device's memory in bytes (CUDA: its total, the child runs alone on it; CPU: available)."""
    import psutil
    import torch

    return float(
        torch.cuda.get_device_properties(0).total_memory if cuda else psutil.virtual_memory().available
    )


def dataclasses_dict(variant: Variant) -> dict[str, Any]:
    return {
        "name": variant.name,
        "gradient_checkpointing": variant.gradient_checkpointing,
        "transitions_per_forward": variant.transitions_per_forward,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return _child(json.loads(args.child), Path(args.raw_out))
    import torch

    from benchmarks.bench.environment import environment
    from benchmarks.bench.gpu_report import build_gpu_report, write_gpu_report

    cuda = torch.cuda.is_available() and not args.cpu_scale
    if not cuda and not args.cpu_scale:
        print("error: no CUDA device; run with --cpu-scale for the small CPU version", file=sys.stderr)
        return 2
    header = {
        "scale": "cpu-scale" if args.cpu_scale else "gpu",
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "budget_s": args.budget_s,
    }
    started = time.perf_counter()

    def write(records: list[dict[str, Any]], build_s: float) -> tuple[dict[str, Any], Path, str]:
        report = build_gpu_report(header, records, build_s, time.perf_counter() - started)
        return (report, *write_gpu_report(report, Path(args.out)))

    records, build_s = run_all(args, cuda, lambda r, b: print(f"[gpu-check] report: {write(r, b)[1]}.md"))
    report, stem, table = write(records, build_s)
    print(table)
    print(f"[gpu-check] wrote {stem}.json and .md in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

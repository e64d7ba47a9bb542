"""Running the benchmark: each algorithm in its own process, through the production `train`.

The parent (`run_children`) starts one child process per algorithm, so each has its own peak
memory and allocator state; the child (`run_algo`) composes the project's config, runs
`rlcm_exp.training.build.train` with a `BenchCallback` and returns the raw measurements.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from benchmarks.bench.device import cuda_available
from benchmarks.bench.floor import matmul_peak_flops
from benchmarks.bench.instrument import BenchCallback, Collected
from benchmarks.bench.scales import RunSpec
from rlcm_exp.configs import compose
from rlcm_exp.training.build import train

# the repository root: the child imports `benchmarks` from it whatever the caller's working directory
REPO = Path(__file__).resolve().parents[2]


def run_algo(algo: str, spec: RunSpec) -> dict[str, Any]:
    """Run the production epochs `spec` asks for (warm-up + measured) of one algorithm in this process;
    the raw measurements."""
    cfg = compose("config", spec.overrides)
    collected = Collected(algo=algo)
    with tempfile.TemporaryDirectory(prefix=f"bench-{algo}-") as run_dir:
        callback = BenchCallback(
            collected, spec.warmup, spec.compare_transitions, spec.compare_repeats, floor=spec.floor
        )
        train(cfg, Path(run_dir), callbacks=[callback])
    device = torch.device("cuda" if cuda_available() else "cpu")
    peak_dtype = torch.bfloat16 if cuda_available() else torch.float32
    sampler: dict[str, Any] = OmegaConf.to_container(cfg.sampler, resolve=True)  # type: ignore[assignment]
    return {
        "algo": algo,
        "overrides": spec.overrides,
        "notes": spec.notes,
        "sampler": {k: v for k, v in sampler.items() if not str(k).startswith("_")},
        "batch_plan": collected.batch_plan,
        "warmup_epochs": spec.warmup,
        "epochs": collected.epochs,
        "floors": collected.floors,
        "flops": collected.flops,
        "matmul_peak": {
            "dtype": str(peak_dtype).removeprefix("torch."),
            "flops_per_s": matmul_peak_flops(device, peak_dtype),
        },
        "cuda_syncs_warmup_epoch": collected.cuda_syncs_warmup_epoch,
        "checkpoint_s": collected.checkpoint_s,
        "full_checkpoints_s": collected.checkpoints_s,
        "checkpoint_every": int(cfg.train.get("checkpoint_every", 0) or 0),
        "torch_threads": torch.get_num_threads(),
        "unet_batches": collected.unet_batches,
        "transitions_compare": collected.transitions_compare,
    }


@contextmanager
def scratch(scale: str) -> Iterator[str | None]:
    """A folder for the full scale's GBs of random weights, removed afterwards; None at other scales."""
    if scale != "full":
        yield None
        return
    folder = tempfile.mkdtemp(prefix="bench-full-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _child_env() -> dict[str, str]:
    parts = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    # the benchmark never downloads anything; a caller's explicit setting wins
    defaults = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**defaults, **os.environ, "PYTHONPATH": os.pathsep.join(parts)}


def child_command(args: Any, algo: str, raw_path: Path, full_dir: str | None) -> list[str]:
    """The command line of the child process measuring `algo` (hidden flags of the same CLI)."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--scale", args.scale, "--repeats", str(args.repeats)]
    cmd += ["--only", algo, "--raw-out", str(raw_path), "--full-downscale", str(args.full_downscale)]
    cmd += ["--warmup", str(args.warmup)] if args.warmup is not None else []
    cmd += ["--compare-transitions-per-forward"] if args.compare_transitions_per_forward else []
    cmd += ["--full-dir", full_dir] if full_dir else []
    for e in args.extra:
        cmd += ["--set", e]
    return cmd


def run_children(args: Any, algos: list[str]) -> tuple[dict[str, dict[str, Any]], int]:
    """Raw measurements per algorithm, each from its own process; stops at the first that fails and
    returns its exit code (0 when all succeeded)."""
    raws: dict[str, dict[str, Any]] = {}
    with scratch(args.scale) as full_dir, tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        for algo in algos:
            raw_path = Path(tmp) / f"{algo}.json"
            cmd = child_command(args, algo, raw_path, full_dir)
            print(f"[bench] {algo}: {' '.join(cmd[2:])}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO, env=_child_env())
            if proc.returncode != 0:
                print(f"error: the {algo} benchmark failed (exit {proc.returncode})", file=sys.stderr)
                return raws, proc.returncode
            raws[algo] = json.loads(raw_path.read_text())
    return raws, 0

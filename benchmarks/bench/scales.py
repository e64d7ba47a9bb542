"""The benchmark sizes and the Hydra overrides that turn one into a run of one algorithm."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from benchmarks.bench.device import cuda_available

ALGOS = ("rlcm", "ddpo")


@dataclasses.dataclass(frozen=True)
class Scale:
    """One benchmark size. RLCM and DDPO share every batch setting; each keeps its paper's sampler."""

    model: list[str]  # Hydra overrides choosing the model family and task
    samples_per_epoch: int
    sample_batch_size: int
    train_batch_size: int
    samples_per_step: int
    rlcm_steps: int = 8  # the paper's RLCM horizon
    ddpo_steps: int = 50  # DDPO's DDIM steps, with classifier-free guidance (batch doubling)
    warmup: int = 1  # epochs run first and not measured (allocator, oneDNN primitives, first image grid)


SCALES: dict[str, Scale] = {
    # random ~0.1M-parameter UNets at 8x8 latents: Python dominates, reported without a target
    "tiny": Scale(["model=tiny", "task=compression"], 16, 8, 4, 16),
    # the toy world's trained ~1M-parameter UNets at 8x8 latents (32 px): target overhead <= 1.05 on a CPU.
    # 32 trajectories in 4 sampling batches of 8, one optimizer step per epoch over minibatches of 4
    # (~model_defaults: the toy family's learning settings, e.g. DDPO without CFG, are not what is timed)
    "toy": Scale(["model=toy", "task=toy_compression", "~model_defaults"], 32, 8, 4, 32),
    # SD-1.5-sized UNet/VAE/text encoder with random weights at the paper's resolutions (GPU); on a
    # CPU `full_cpu` shrinks it to one trajectory and one trained transition
    "full": Scale(["model=dreamshaper_v7", "task=compression"], 16, 8, 2, 16, warmup=1),
}


def full_cpu(scale: Scale) -> Scale:
    """The full scale on a CPU: one trajectory per epoch, so the path runs in minutes, not hours."""
    return dataclasses.replace(
        scale, samples_per_epoch=1, sample_batch_size=1, train_batch_size=1, samples_per_step=1, warmup=0
    )


def algo_overrides(scale: Scale, algo: str) -> list[str]:
    """The overrides every scale shares: the algorithm, its steps, the batch settings, no logging or eval."""
    steps = scale.rlcm_steps if algo == "rlcm" else scale.ddpo_steps
    return [
        *scale.model,
        f"algo={algo}",
        f"sampler.num_steps={steps}",
        "logger=none",
        "train.eval_every=0",
        f"train.samples_per_epoch={scale.samples_per_epoch}",
        f"train.sample_batch_size={scale.sample_batch_size}",
        f"train.train_batch_size={scale.train_batch_size}",
        f"train.samples_per_step={scale.samples_per_step}",
        "train.inner_epochs=1",
    ]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What one algorithm's benchmark process runs: the overrides, its warm-up epochs, notes for the table."""

    overrides: list[str]
    warmup: int
    notes: list[str]
    # train.transitions_per_forward values (0 = all) the last round's update is replayed with
    compare_transitions: list[int] = dataclasses.field(default_factory=list)
    compare_repeats: int = 1
    floor: bool = True  # time the compute floor after each measured epoch


def run_spec(
    scale_name: str,
    algo: str,
    repeats: int,
    warmup: int | None,
    extra: list[str],
    full_dir: str | None,
    full_downscale: int,
    compare: bool = False,
) -> RunSpec:
    """The overrides of `warmup + repeats` epochs of `algo` at `scale_name`; `extra` is applied last but
    one (the device choice comes after it, as the benchmark always did). `compare`: the last round's
    update is also replayed with one and with all trained transitions per UNet call."""
    scale = SCALES[scale_name]
    notes: list[str] = []
    overrides = algo_overrides(scale, algo)
    if scale_name == "full":
        overrides, scale, notes = _full_overrides(scale, algo, overrides, full_dir, full_downscale, compare)
    warm = scale.warmup if warmup is None else warmup
    overrides += [f"train.epochs={warm + repeats}", *extra]
    # on a GPU the MFU denominator is the bf16 matmul rate
    overrides += ["mixed_precision=bf16"] if cuda_available() else ["device=cpu"]
    return RunSpec(overrides, warm, notes, [1, 0] if compare else [], repeats)


def _full_overrides(
    scale: Scale, algo: str, overrides: list[str], full_dir: str | None, downscale: int, compare: bool
) -> tuple[list[str], Scale, list[str]]:
    from benchmarks.bench.full_models import build_full_member

    kind = "lcm" if algo == "rlcm" else "diffusion"
    root = Path(full_dir or tempfile.mkdtemp(prefix="bench-full-"))
    folder = build_full_member(root, kind)
    native = 768 if algo == "rlcm" else 512  # the paper's resolutions
    notes = []
    if cuda_available():
        resolution, dtype = native, "bfloat16"
    else:
        scale = full_cpu(scale)
        resolution, dtype = native // downscale, "float32"
        notes.append(
            f"CPU: batch 1, one sampling batch, one trained transition, resolution {resolution} px "
            f"(the paper's {native} / {downscale}; the paper's sizes take hours per epoch on a CPU)"
        )
        overrides = algo_overrides(scale, algo)
    # one trained transition on a CPU (two when one-vs-all per call is compared): the path is
    # exercised, the hours of DDPO's 50 are not spent
    per_trajectory = 2 if compare else 1
    fraction = (
        "1.0"
        if cuda_available()
        else f"{(per_trajectory + 0.1) / (scale.rlcm_steps - 1 if algo == 'rlcm' else scale.ddpo_steps):.4f}"
    )
    overrides = [
        *overrides,
        f"model.{kind}.local_path={folder}",
        f"model.dtype={dtype}",
        f"sampler.resolution={resolution}",
        f"algo.timestep_fraction={fraction}",
    ]
    return overrides, scale, notes


def toy_weights_missing(scale_name: str, extra: list[str]) -> Path | None:
    """The toy weights folder when `--scale toy` would need it and it holds no trained models, else None."""
    if scale_name != "toy" or any(e.startswith("model.weights_dir=") for e in extra):
        return None
    from rlcm_exp.toy import family

    weights = family.TOY_WEIGHTS  # read at call time: tests point it at an empty folder
    return None if (weights / "lcm" / "model_index.json").is_file() else weights

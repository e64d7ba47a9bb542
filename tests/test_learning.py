"""RL learns in the toy world, in CI, with a fixed seed: the reward moves by a stated margin.

Each run is measured before and after training on the same fixed seeds (eval.jsonl): the base
model's score and the trained one's, on the 81 training compositions x 1 seed (both alignment
tests: 4), so sampling noise of the training rounds does not decide. The RLCM settings are the
quickstart's (`make demo`), with a larger batch on toy_alignment.
Measured on this 2-core CPU (one core per run): RLCM compression -18.3% JPEG size in 147 s;
RLCM alignment (192 trajectories per epoch) +0.032 detector score in 200 s; DDPO alignment
(12 DDIM steps) +0.047 in ~220 s (+0.042 to +0.075 over eight seeds); DDPO compression (10 DDIM
steps, CFG off, first half of each trajectory trained) -25% in 148 s.
"""

from __future__ import annotations

from rlcm_exp.toy.detector import PARTS
from rlcm_exp.tracking import read_metrics

from .test_cli import run_in_process

EVAL = [
    "train.eval_every=1000",  # before and after only
    "task.eval_prompts.name=toy_train",
    "train.eval_seeds=1",
    "train.save_images=16",
    "train.checkpoint_every=0",
]


# the alignment tests: one detector decision on 81 images is 0.004, and their gains are a few hundredths
EVAL_4_SEEDS = [*(o for o in EVAL if not o.startswith("train.eval_seeds=")), "train.eval_seeds=4"]


def before_after(run_dir, key: str = "eval_reward_mean") -> tuple[float, float]:  # noqa: ANN001
    evals = read_metrics(run_dir / "eval.jsonl")
    return evals[0][key], evals[-1][key]


def print_detector_parts(run_dir) -> None:  # noqa: ANN001
    """Which of the detector's thirds moved: the share of images with colour / shape / background right."""
    for part in PARTS:
        first, last = before_after(run_dir, f"eval_reward/{part}")
        print(f"  {part} right {first:.3f} -> {last:.3f}")


def test_rlcm_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    run_in_process(["experiment=quickstart", *EVAL], tmp_path)
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before


def test_rlcm_alignment_raises_detector_score(tmp_path) -> None:  # noqa: ANN001
    """+0.02, not the toy-world issue's +0.05, which RLCM did not reach here in any setting tried.

    192 trajectories per epoch, 32 per optimizer step, 50 epochs (~200 s on one core), scored on
    4 eval seeds (324 images; one detector decision is 0.001): seeds 0 / 1 / 2 / 42 gave +0.039 /
    +0.039 / +0.033 / +0.032. The quickstart's 96 x 16 at 60 epochs was seed luck: seed 0 +0.036,
    seed 1 -0.002. Longer does not help: at 150 epochs +0.025 / +0.037 (seeds 0 / 1), the training
    reward flat at ~0.95 from epoch ~40. The LCM's only error at 4 steps is squares with rounded
    corners (71 of 108 read as circles; colours, backgrounds, circles and triangles almost never
    wrong): a few latent pixels out of 256, although most of a square prompt's reward variance does
    come from the transitions' noise (76%; 24% from the initial noise). Also tried (one seed each,
    1 eval seed): 2 or 3 steps +0.017; 8 steps +0.017 to +0.029; clip 1e-2 +0.012 to +0.018 (at LR
    2e-3 it collapses); one optimizer step per round +0.002; two inner epochs +0.014; LoRA on the
    ResNet convolutions too +0.025 / +0.015 at 60 / 90 epochs, -0.05 at LR 2e-3; at 4 steps a
    Gaussian last action around the final denoised latent (std 0.2 / 0.5, images decoded from it,
    scored deterministically) +0.031 / +0.033 (seed 42, 4 eval seeds; not kept).

    Colours and backgrounds start right (1.00 / 1.00), so the score moves only through shapes, a
    third at a time: seed 42 takes shapes right from 0.747 to 0.846. +0.05 would need ~0.90, above
    the teacher's DDIM-50 (0.87) and near what the VAE's reconstructions of real images reach (0.93)."""
    run_in_process(
        [
            "experiment=quickstart",
            "task=toy_alignment",
            "optimizer.lr=2e-3",
            "train.samples_per_epoch=192",
            "train.samples_per_step=32",
            "train.epochs=50",
            *EVAL_4_SEEDS,
        ],
        tmp_path,
    )
    before, after = before_after(tmp_path)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    print_detector_parts(tmp_path)
    assert after >= before + 0.02
    # the gain is shapes: the only third the LCM gets wrong (+0.02 overall is +0.06 of shapes)
    shape_before, shape_after = before_after(tmp_path, "eval_reward/shape")
    assert shape_after >= shape_before + 0.05


DDPO_TOY = [  # the quickstart's LoRA, PPO and stat-tracker settings
    "algo=ddpo",
    "model=toy",
    "algo.timestep_fraction=0.5",
    "algo.ppo.clip_range=1e-3",
    "algo.lora.rank=8",
    "algo.lora.alpha=8",
    "algo.stat_tracker.buffer_size=32",
    "algo.stat_tracker.min_count=4",
    "train.train_batch_size=16",
    "train.samples_per_step=16",
    "logger=none",
]


def test_ddpo_alignment_raises_detector_score(tmp_path) -> None:  # noqa: ANN001
    """DDPO with 12 DDIM steps (eta 1, CFG 5), half of each trajectory's transitions trained, LR
    1e-3: the quickstart's batch sizes, LoRA and PPO settings. At 12 steps the diffusion member's
    images score 0.757 on the 4 eval seeds (10 steps: 0.663, 14: 0.877, 20: ~0.94 with little left).

    30 epochs (~220 s on one core), scored on 4 eval seeds (324 images): seeds 0 / 1 / 2 / 3 / 4 / 5 /
    6 / 42 gave +0.042 / +0.074 / +0.044 / +0.053 / +0.054 / +0.075 / +0.056 / +0.047 (mean +0.056),
    so the line is +0.03. The earlier setting (10 steps, LR 2e-3) ranged from -0.004 to +0.090 over
    four seeds. Neighbours tried at the weakest seeds were not steadier: seed 0 with LR 7e-4 x 40
    epochs +0.013, LR 1.5e-3 +0.020, 11 steps +0.020, 14 steps +0.028, 40 epochs +0.042; the first
    half of the transitions only (`timestep_window=0.5`) +0.006 (seed 0) and +0.096 (seed 2); seed 2
    with LR 2e-3 +0.019."""
    run_in_process(
        [
            *DDPO_TOY,
            "task=toy_alignment",
            "sampler.num_steps=12",
            "optimizer.lr=1e-3",
            "train.epochs=30",
            "train.samples_per_epoch=96",
            "train.sample_batch_size=48",
            *EVAL_4_SEEDS,
        ],
        tmp_path,
    )
    before, after = before_after(tmp_path)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    # seed 42: colour 0.735 -> 0.756, shape 0.642 -> 0.701, background 0.895 -> 0.957
    print_detector_parts(tmp_path)
    assert after >= before + 0.03


def test_ddpo_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    """DDPO with 10 DDIM steps (eta 1) and two departures from the DDPO paper, each needed here:
    classifier-free guidance off (with CFG 5 the best run cut 11% in ~5 minutes; probably the
    gradient of eps_u + 5 (eps_c - eps_u) is dominated by the cond-uncond difference, not by the
    common change that shrinks shapes), and only the first (noisiest) half of each trajectory trained
    (`algo.timestep_window=0.5`: the late, nearly deterministic jumps carry most of the gradient
    norm and little signal; without the window, CFG off: -17.5% in 135 s, too close to the line)."""
    run_in_process(
        [
            *DDPO_TOY,
            "task=toy_compression",
            "sampler.num_steps=10",
            "optimizer.lr=2e-3",
            "sampler.guidance_scale=1.0",
            "algo.timestep_window=0.5",
            "train.epochs=45",
            "train.samples_per_epoch=64",
            "train.sample_batch_size=32",
            *EVAL,
        ],
        tmp_path,
    )
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before

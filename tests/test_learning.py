"""RL learns in the toy world, in CI, with a fixed seed: the reward moves by a stated margin.

Each run is measured before and after training on the same fixed seeds (eval.jsonl): the base
model's score and the trained one's, on the 81 training compositions x 1 seed (both alignment
tests: 4), so sampling noise of the training rounds does not decide. Each test's settings are a
config, conf/experiment/toy/<algo>_<task>.yaml; the tests add only the evaluation overrides below.
The RLCM compression settings are the quickstart's (`make demo`).
Measured on this 2-core CPU (one core per run, seed 42, the recipe-2 toy weights): RLCM
compression -16.6% JPEG size in 105 s; RLCM alignment (the same sizes, LR 2e-3) +0.056
detector score; DDPO alignment (6 DDIM steps, CFG 3, 40 epochs) +0.055; DDPO compression (10 DDIM
steps, CFG off, first half of each trajectory trained, 34 epochs) -19.5%.
All are marked slow: `make test` runs them (each a unit of its own on the xdist workers), `make
test-fast` and a bare `pytest` do not.
"""

from __future__ import annotations

import pytest

from .helpers import EVAL, EVAL_4_SEEDS, before_after, print_detector_parts, run_in_process

pytestmark = pytest.mark.slow


def test_rlcm_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    run_in_process(["experiment=toy/rlcm_compression", *EVAL], tmp_path)
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before


def test_rlcm_alignment_raises_detector_score(tmp_path) -> None:  # noqa: ANN001
    """The toy-world issue's +0.05: the compression settings (40 epochs of 96 trajectories, 16 per
    optimizer step) at LR 2e-3, scored on 4 eval seeds (324 images; one detector decision is 0.001).

    Measured on the recipe-2 weights (teacher trained on noisy captions): seeds 42 / 0 both +0.056
    (seed 42: colour right 0.81 -> 0.92, shape 0.68 -> 0.74; 0.40x the trajectories of the setting it
    replaced, 50 epochs of 192 in steps of 32, +0.058 / +0.068). Tried at seed 42: 30 epochs of 96 at
    LR 3e-3 +0.027, and with clip 5e-3 +0.013.
    On the recipe-1 weights (clean captions) the larger setting gained only +0.032-0.039 over four
    seeds: that LCM's only errors were squares with rounded corners, a few latent pixels drawn by
    its deterministic last call, which RL moves only through the earlier transitions' means (tried
    there without reaching +0.05: 2, 3 or 8 steps, clip 1e-2, one optimizer step or two inner epochs
    per round, LoRA on the ResNet convolutions, 150 epochs, a Gaussian last action)."""
    run_in_process(["experiment=toy/rlcm_alignment", *EVAL_4_SEEDS], tmp_path)
    before, after = before_after(tmp_path)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    print_detector_parts(tmp_path)
    assert after >= before + 0.05


def test_ddpo_alignment_raises_detector_score(tmp_path) -> None:  # noqa: ANN001
    """DDPO with 6 DDIM steps (eta 1) at classifier-free guidance 3, half of each trajectory's
    transitions trained, LR 1.5e-3, 40 epochs: the quickstart's batch sizes, LoRA and PPO settings.
    At 6 steps and CFG 3 the diffusion member's images score 0.841 on the 4 eval seeds (at CFG 5,
    8-12 steps start at ~0.90-0.92 with little left to gain). Seed 42: +0.055; 30 epochs at LR 1.5e-3:
    +0.046.

    The earlier setting, LR 1e-3 and 60 epochs (~265 s on one core): seeds 42 / 0 / 1 +0.074 / +0.065 /
    +0.042. At the DDPO paper's CFG 5
    (6 steps, 60 epochs) the gain was smaller: +0.041 / +0.031 (seeds 42 / 0), LR 1.5e-3 +0.050
    (314 s) and at 50 epochs
    +0.035 / +0.019, clip 2e-3 +0.044, all transitions trained (40 epochs) +0.036, 192 trajectories
    per epoch +0.031, 5 steps +0.029: as on toy_compression, CFG 5 slows DDPO (probably the gradient
    of eps_u + 5 (eps_c - eps_u) is dominated by the cond-uncond difference)."""
    run_in_process(["experiment=toy/ddpo_alignment", *EVAL_4_SEEDS], tmp_path)
    before, after = before_after(tmp_path)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    # seed 42: colour 0.886 -> 0.948, shape 0.775 -> 0.799, background 0.861 -> 0.997
    print_detector_parts(tmp_path)
    assert after >= before + 0.05


def test_ddpo_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    """DDPO with 10 DDIM steps (eta 1) and two departures from the DDPO paper, each needed here:
    classifier-free guidance off (with CFG 5 the best run cut 11% in ~5 minutes; probably the
    gradient of eps_u + 5 (eps_c - eps_u) is dominated by the cond-uncond difference, not by the
    common change that shrinks shapes), and only the first (noisiest) half of each trajectory trained
    (`algo.timestep_window=0.5`: the late, nearly deterministic jumps carry most of the gradient
    norm and little signal; without the window, CFG off: -17.5% in 135 s, too close to the line).
    Those figures are the recipe-1 weights'; on recipe 2 this setting cuts 22.2% in model=toy algo=ddpo's 45
    epochs (seed 42), 19.5% in the 34 this test runs (28: 15.7%)."""
    run_in_process(["experiment=toy/ddpo_compression", *EVAL], tmp_path)
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before


def test_grpo_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    """GRPO (issue 21): groups of 4 images per prompt, advantages normalised within each group, the
    clipped PPO loss; otherwise RLCM's toy settings (conf/experiment/toy/grpo_compression.yaml).
    Measured (seed 42): 24 epochs, -18.7% JPEG size (40 epochs, 96 s on one core: -23.6%)."""
    run_in_process(["experiment=toy/grpo_compression", *EVAL], tmp_path)
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before


def test_rebel_compression_cuts_jpeg_size_by_15_percent(tmp_path) -> None:  # noqa: ANN001
    """REBEL (issue 21): pairs of images per prompt, the log-ratio difference regressed onto the
    reward difference (conf/experiment/toy/rebel_compression.yaml). Measured (seed 42): eta 0.1, all
    three transitions in one UNet call, 24 epochs: -17.5% JPEG size (40 epochs, 93 s on one core:
    -23.5%). With eta 0.01 the
    regression target (eta x reward difference, ~1e-3) held the policy to a few hundredths of RLCM's
    per-round change: -6.6% in 40 epochs."""
    run_in_process(["experiment=toy/rebel_compression", *EVAL], tmp_path)
    before, after = before_after(tmp_path)  # rewards are -kB
    print(f"JPEG kB before {-before:.4f} after {-after:.4f} ({(before - after) / before:+.1%})")
    assert -after <= 0.85 * -before


def test_grpo_alignment_raises_detector_score(tmp_path) -> None:  # noqa: ANN001
    """GRPO (issue 21) on the detector reward, groups of 4 (conf/experiment/toy/grpo_alignment.yaml)."""
    run_in_process(["experiment=toy/grpo_alignment", *EVAL_4_SEEDS], tmp_path)
    before, after = before_after(tmp_path)
    print(f"detector score before {before:.4f} after {after:.4f} ({after - before:+.4f})")
    print_detector_parts(tmp_path)
    assert after >= before + 0.05

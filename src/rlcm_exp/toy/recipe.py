"""Train the toy model family on a CPU: VAE -> text encoder + teacher UNet -> LCM distillation.

    python -m rlcm_exp.toy.recipe --out src/rlcm_exp/toy/weights --seed 0 --schedule full

The command line of `rlcm_exp.toy.runner.run` (the recipe itself and its stages are described
there); writes DIR/diffusion, DIR/lcm, DIR/recipe.json and DIR/quality.json.
"""

from __future__ import annotations

import argparse

from rlcm_exp.toy import WEIGHTS_DIR
from rlcm_exp.toy.captions import CAPTION_NOISE, check_caption_noise
from rlcm_exp.toy.runner import run
from rlcm_exp.toy.stages import SCHEDULES


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument("--threads", type=int, default=2, help="1 on a machine shared with other jobs")
    parser.add_argument(
        "--caption-noise",
        type=float,
        default=CAPTION_NOISE,
        help="probability of re-drawing each attribute word of a teacher training caption "
        f"(default {CAPTION_NOISE}; 0: clean captions)",
    )
    args = parser.parse_args()
    try:
        check_caption_noise(args.caption_noise)
    except ValueError as err:
        parser.error(f"--caption-noise: {err}")
    run(**vars(args))  # every flag is one of run()'s arguments, by name


if __name__ == "__main__":
    main()

"""Train the toy model family on a CPU: VAE -> text encoder + teacher UNet -> LCM distillation.

    python -m rlcm_exp.toy.recipe --out src/rlcm_exp/toy/weights --seed 0 --schedule full
    python -m rlcm_exp.toy.recipe --family flow --out src/rlcm_exp/toy/weights_flow --seed 0

The command line of `rlcm_exp.toy.runner.run` (the recipe itself and its stages are described
there); writes DIR/diffusion, DIR/lcm, DIR/recipe.json and DIR/quality.json. With `--family flow`,
that of `rlcm_exp.toy.flow_runner.run_flow`: the rectified-flow teacher and its consistency-distilled
student on the committed VAE and text encoder (frozen), written to DIR/teacher, DIR/student,
DIR/recipe.json and DIR/quality.json.
"""

from __future__ import annotations

import argparse

from rlcm_exp.toy import FLOW_WEIGHTS_DIR, WEIGHTS_DIR
from rlcm_exp.toy.captions import CAPTION_NOISE, check_caption_noise
from rlcm_exp.toy.flow_runner import run_flow
from rlcm_exp.toy.flow_stages import FLOW_SCHEDULES
from rlcm_exp.toy.runner import RecipeOptions, run
from rlcm_exp.toy.stages import SCHEDULES


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--family",
        choices=("diffusion", "flow"),
        default="diffusion",
        help="diffusion: VAE, DDIM teacher and LCM (model=toy); flow: rectified-flow teacher and its "
        "few-step student on the committed VAE and text encoder (model=toy_flow)",
    )
    parser.add_argument("--out", default=None, help="default: src/rlcm_exp/toy/weights (flow: weights_flow)")
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
    flow = args.family == "flow"
    if flow and args.schedule not in FLOW_SCHEDULES:
        parser.error(f"--schedule {args.schedule}: the flow recipe's schedules are {sorted(FLOW_SCHEDULES)}")
    out = args.out or str(FLOW_WEIGHTS_DIR if flow else WEIGHTS_DIR)
    options = RecipeOptions(args.seed, args.schedule, args.threads, args.caption_noise)
    if flow:
        run_flow(out, options)
    else:
        run(out, options)


if __name__ == "__main__":
    main()

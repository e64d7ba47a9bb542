"""Measure the toy model family with the real pipelines loaded from disk; write DIR/quality.json.

    python -m rlcm_exp.toy.quality --weights src/rlcm_exp/toy/weights --n 256

The command line of `rlcm_exp.toy.scoring.measure`, which describes every setting measured.
"""

from __future__ import annotations

import argparse

from rlcm_exp.toy import WEIGHTS_DIR
from rlcm_exp.toy.scoring import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--weights", default=str(WEIGHTS_DIR))
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--sweep-n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddim-guidance", type=float, default=None, help="default: picked by the sweep")
    parser.add_argument("--lcm-guidance", type=float, default=None, help="default: picked by the sweep")
    parser.add_argument("--threads", type=int, default=2, help="1 on a machine shared with other jobs")
    args = parser.parse_args()
    measure(
        args.weights,
        n=args.n,
        seed=args.seed,
        sweep_n=args.sweep_n,
        ddim_guidance=args.ddim_guidance,
        lcm_guidance=args.lcm_guidance,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()

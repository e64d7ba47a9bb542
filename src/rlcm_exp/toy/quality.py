"""Measure the toy model family with the real pipelines loaded from disk; write DIR/quality.json.

    python -m rlcm_exp.toy.quality --weights src/rlcm_exp/toy/weights --n 256
    python -m rlcm_exp.toy.quality --family flow --weights src/rlcm_exp/toy/weights_flow --n 128

The command line of `rlcm_exp.toy.scoring.measure` (with `--family flow`, of
`rlcm_exp.toy.flow_scoring.measure_flow`), which describes every setting measured.
"""

from __future__ import annotations

import argparse

import torch

from rlcm_exp.toy import FLOW_WEIGHTS_DIR, WEIGHTS_DIR
from rlcm_exp.toy.flow_scoring import measure_flow
from rlcm_exp.toy.scoring import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--family", choices=("diffusion", "flow"), default="diffusion")
    parser.add_argument(
        "--weights", default=None, help="default: src/rlcm_exp/toy/weights (flow: weights_flow)"
    )
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--sweep-n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ddim-guidance", type=float, default=None, help="default: picked by the sweep")
    parser.add_argument("--lcm-guidance", type=float, default=None, help="default: picked by the sweep")
    parser.add_argument("--threads", type=int, default=2, help="1 on a machine shared with other jobs")
    args = parser.parse_args()
    if args.family == "flow":
        torch.set_num_threads(args.threads)
        measure_flow(args.weights or str(FLOW_WEIGHTS_DIR), n=args.n, seed=args.seed, sweep_n=args.sweep_n)
        return
    measure(
        args.weights or str(WEIGHTS_DIR),
        n=args.n,
        seed=args.seed,
        sweep_n=args.sweep_n,
        ddim_guidance=args.ddim_guidance,
        lcm_guidance=args.lcm_guidance,
        threads=args.threads,
    )


if __name__ == "__main__":
    main()

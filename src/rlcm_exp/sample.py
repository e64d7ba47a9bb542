"""`python -m rlcm_exp.sample model=toy sampler.num_steps=4 prompts='[a red circle on a blue background]' out=DIR`

Writes one PNG per image and samples.json (prompt, seed, steps, sampler, checkpoint per image).
Each image has its own seeded generator, so an image does not depend on the batch it was drawn in.
An `out` folder that already holds samples is refused unless overwrite=true, which replaces only
that earlier run's samples.json and the PNGs it lists. Exit codes: 0 written, 2 bad config or input.
conf/sample.yaml lists the options; the library is `rlcm_exp.evaluation.sampling`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH
from rlcm_exp.errors import exit_on_config_error
from rlcm_exp.evaluation.sampling import sample_images


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    exit_on_config_error(lambda: sample_images(cfg))


if __name__ == "__main__":
    main()

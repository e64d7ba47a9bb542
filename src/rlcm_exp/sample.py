"""`python -m rlcm_exp.sample checkpoint=RUN_DIR prompts='[a red circle on a blue background]' out=DIR`

Writes one PNG per image and samples.json (prompt, seed, steps, sampler, checkpoint per image).
Given a run dir (or a checkpoint folder inside one), the model and sampler are the run's (its
config.yaml) unless set on the command line (`model=toy sampler.num_steps=4` ...); without one,
conf/sample.yaml's model. Each image has its own seeded generator, so an image does not depend on
the batch it was drawn in. An `out` folder that already holds samples is refused unless
overwrite=true, which replaces only that earlier run's samples.json and the PNGs it lists.
Exit codes: 0 written, 2 bad config or input. The library is `rlcm_exp.evaluation.sampling`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH, OUTPUT_DIR_KEYS, check_output_dirs, register_help_resolver
from rlcm_exp.errors import exit_on_config_error
from rlcm_exp.secrets import redact_output

register_help_resolver()  # ${rlcm_options:GROUP} of the --help template (conf/hydra/help/)


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="sample")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rlcm_exp.evaluation.sampling import (
        sample_images,
    )  # torch: only once a command runs (--help is quick)

    overrides = list(HydraConfig.get().overrides.task)
    exit_on_config_error(lambda: sample_images(cfg, overrides))


if __name__ == "__main__":
    redact_output(sys.argv[1:])  # no secret of the command line in any message, Hydra's included
    # out= is where Hydra writes first (${out}/.hydra_run): a file or an unwritable path is one line
    exit_on_config_error(lambda: check_output_dirs(sys.argv[1:], ("out", *OUTPUT_DIR_KEYS)))
    main()

"""`python -m rlcm_exp.evaluate checkpoint=RUN_DIR [steps=[2,4,8]] [budgets=[0.5,1,2] | budget_points=6]`

Held-out reward, seconds per image of full rollouts, and reward under an inference-time budget per
image (paper Fig. 6) for one checkpoint, printed and written to eval.json (conf/evaluate.yaml lists
the options). Given a run dir, the model, sampler, task and reward are the run's unless set on the
command line. The library is `rlcm_exp.evaluation`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH, register_help_resolver
from rlcm_exp.errors import exit_on_config_error
from rlcm_exp.secrets import redact_output

register_help_resolver()  # ${rlcm_options:GROUP} of the --help template (conf/hydra/help/)


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rlcm_exp.evaluation.suite import run_evaluation  # torch: only once a command runs (--help is quick)

    overrides = list(HydraConfig.get().overrides.task)
    exit_on_config_error(lambda: run_evaluation(cfg, overrides))


if __name__ == "__main__":
    redact_output(sys.argv[1:])  # no secret of the command line in any message, Hydra's included
    main()

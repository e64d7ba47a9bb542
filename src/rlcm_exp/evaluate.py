"""`python -m rlcm_exp.evaluate checkpoint=RUN_DIR [steps=[2,4,8]] [budgets=[0.5,1,2] | budget_points=6]`

Held-out reward, seconds per image of full rollouts, and reward under an inference-time budget per
image (paper Fig. 6) for one checkpoint, printed and written to eval.json (conf/evaluate.yaml lists
the options). The library is `rlcm_exp.evaluation`.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH
from rlcm_exp.errors import exit_on_config_error
from rlcm_exp.evaluation.suite import run_evaluation


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    exit_on_config_error(lambda: run_evaluation(cfg, overrides))


if __name__ == "__main__":
    main()

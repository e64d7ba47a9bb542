"""`python -m rlcm_exp [overrides]` (also `rlcm-exp`): train one run. Parsing and exit codes only.

With no overrides this is the paper's RLCM aesthetic run; `experiment=quickstart` runs on a laptop
CPU. See conf/config.yaml for every key; the run itself is `rlcm_exp.training.build.train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH
from rlcm_exp.errors import exit_on_config_error


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from rlcm_exp.training.build import train
    from rlcm_exp.training.trainer import PREEMPTED_EXIT_CODE, Preempted

    hc = HydraConfig.get()
    if cfg.device == "job" and torch.cuda.is_available():  # parallel sweep jobs: job N takes GPU N mod count
        torch.cuda.set_device(int(getattr(hc.job, "num", None) or 0) % torch.cuda.device_count())
    if hc.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        with open_dict(cfg):  # every run of a sweep lands in one wandb group, so their curves overlay
            cfg.logger.group = f"sweep-{Path(hc.sweep.dir).name}"
    try:
        exit_on_config_error(lambda: train(cfg, Path(hc.runtime.output_dir)))
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()

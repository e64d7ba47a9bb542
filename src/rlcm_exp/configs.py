"""Where the Hydra configs live and how library code composes them.

conf/ sits at the top of the repository (the product's layout) and ships inside the wheel as the
package `rlcm_exp.conf` (setup.py maps the folder), so every command finds it through the import
system, in an editable or a non-editable install, from any working directory.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONFIG_MODULE = "rlcm_exp.conf"
HYDRA_CONFIG_PATH = f"pkg://{CONFIG_MODULE}"  # the entry points' Hydra config_path


def conf_dir() -> Path:
    """The folder holding config.yaml and the config groups (a real folder: the wheel is unzipped)."""
    return Path(str(importlib.resources.files(CONFIG_MODULE)))


def compose(config_name: str = "config", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config outside an entry point (tests, reproduce, benchmarks); `${now:...}` and
    `hydra.*` interpolations stay unresolved, as in Hydra's own compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))

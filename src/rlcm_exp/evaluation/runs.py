"""Reading what a training run left behind, for the commands that use a trained policy (evaluate,
sample, export): its run dir and resolved config, its LoRA, and the policy built from its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.lora import resolve_lora_folder
from rlcm_exp.policies.base import Policy

# taken from the run's config.yaml unless overridden on the command line (algo only labels the results)
RUN_GROUPS = ("model", "sampler", "task", "reward", "algo")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def pick_device(name: str) -> torch.device:
    """`device: auto` (CUDA when present) or `device: cpu` of the command configs."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu")


def find_run_dir(checkpoint: str | Path) -> Path | None:
    """The run dir behind `checkpoint`: itself, or RUN of RUN/checkpoints/NAME; None for a bare LoRA folder."""
    p = Path(checkpoint).expanduser()
    for candidate in (p, p.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def load_run_config(run_dir: Path) -> DictConfig:
    """The resolved config a training run saved as RUN_DIR/config.yaml."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run dir (no config.yaml): give the folder a training run wrote"
        )
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} is not a run config (a mapping)")
    return cfg


def merge_run_config(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """cfg with model/sampler/task/reward taken from the run's resolved config, except where the command
    line overrode them: a group choice (`task=X`) keeps the composed group (a task choice also keeps the
    reward it selects), a key (`sampler.num_steps=2`) is applied on top of the run's group."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    chosen = {k for k in keys if "." not in k}
    if "task" in chosen:
        chosen.add("reward")
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(merged, DictConfig)
    for group in RUN_GROUPS:
        if group in chosen or group not in run_cfg:
            continue
        merged[group] = run_cfg[group]
        for key in keys:
            if key.startswith(group + "."):
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    return merged


class SharedFamily:
    """A model family whose members are loaded once: policies for several step counts share one UNet
    (and so one loaded LoRA)."""

    def __init__(self, family: Any) -> None:
        self.family = family
        self.pipes: dict[str, Any] = {}

    def member(self, kind: str) -> Any:
        return self.family.member(kind)

    def load(self, kind: str, device: torch.device | str = "cpu") -> Any:
        if kind not in self.pipes:
            self.pipes[kind] = self.family.load(kind, device)
        return self.pipes[kind]


def load_lora(policy: Policy, checkpoint: str | Path) -> Path:
    """Load a trained LoRA (a run dir, a checkpoint folder or the safetensors file) into the policy's
    UNet; returns the folder it came from."""
    folder = resolve_lora_folder(checkpoint)
    policy.unet.load_lora_adapter(str(folder), prefix="unet", weight_name=LORA_WEIGHTS)
    return folder

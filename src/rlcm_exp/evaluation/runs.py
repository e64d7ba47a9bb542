"""Reading what a training run left behind, for the commands that use a trained policy (evaluate,
sample, export): its run dir and resolved config, its LoRA, and the policy built from its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.configs import load_saved_config
from rlcm_exp.errors import ConfigError
from rlcm_exp.models.lora import UNET_PREFIX, check_lora_file, resolve_lora_folder
from rlcm_exp.policies.base import Policy

# taken from the run's config.yaml unless overridden on the command line (algo only labels the results)
RUN_GROUPS = ("model", "sampler", "task", "reward", "algo")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# LoRA tensor name endings (diffusers' and peft's) -> the layer size their shape must match
LORA_SUFFIXES = {
    ".lora.down.weight": "in_features",
    ".lora_A.weight": "in_features",
    ".lora.up.weight": "out_features",
    ".lora_B.weight": "out_features",
}


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
    cfg = load_saved_config(path)
    if cfg is None:
        raise ConfigError(f"{path} is not a run config (a mapping)")
    return cfg


def merge_run_config(
    cfg: DictConfig, run_cfg: DictConfig, overrides: list[str], groups: tuple[str, ...] = RUN_GROUPS
) -> DictConfig:
    """cfg with `groups` (model/sampler/task/reward/algo) taken from the run's resolved config, except
    where the command line overrode them: a group choice (`task=X`) keeps the composed group (a task
    choice also keeps the reward it selects), a key (`sampler.num_steps=2`) is applied on top of the
    run's group."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    chosen = {k for k in keys if "." not in k}
    if "task" in chosen:
        chosen.add("reward")
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(merged, DictConfig)
    for group in groups:
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


def config_for_checkpoint(
    cfg: DictConfig, overrides: list[str], groups: tuple[str, ...] = RUN_GROUPS
) -> tuple[DictConfig, Path | None]:
    """The command's config with the run's `groups` merged in when `cfg.checkpoint` lies in a run dir
    (what the command line sets wins), and that run dir (None for a bare LoRA folder or no checkpoint).
    Every `_target_` is then checked importable: a typo fails here, before any model loads."""
    from rlcm_exp.validation import check_targets

    if cfg.get("checkpoint"):  # the LoRA is found and reads whole before any model loads
        check_lora_file(resolve_lora_folder(cfg.checkpoint, cfg.get("ema", False)) / LORA_WEIGHTS)
    run_dir = find_run_dir(cfg.checkpoint) if cfg.get("checkpoint") else None
    if run_dir is not None:
        cfg = merge_run_config(cfg, load_run_config(run_dir), overrides, groups)
    check_targets(cfg)
    return cfg, run_dir


def lora_mismatches(unet: torch.nn.Module, file: Path) -> list[str]:
    """What of a saved LoRA (diffusers format: unet.PATH.lora.{down,up}.weight or lora_{A,B}) has no
    place in this UNet: a module it names that is missing, or a shape that differs (read from the
    file's header: no tensor is loaded)."""
    from safetensors import safe_open

    modules = dict(unet.named_modules())
    problems: list[str] = []
    with safe_open(str(file), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            path = key.removeprefix("unet.")
            suffix = next((s for s in LORA_SUFFIXES if path.endswith(s)), None)
            if suffix is None:
                continue
            name, features = path[: -len(suffix)], LORA_SUFFIXES[suffix]
            module = modules.get(name)
            want = getattr(getattr(module, "base_layer", module), features, None)
            shape = f.get_slice(key).get_shape()
            dim = shape[1] if features == "in_features" else shape[0]  # down: [r, in]; up: [out, r]
            if module is None:
                problems.append(f"{name} is not a module of this UNet")
            elif want is not None and dim != want:
                problems.append(f"{key} has shape {list(shape)}, the layer has {want} {features}")
    return problems


def load_lora(policy: Policy, checkpoint: str | Path, ema: bool = False) -> Path:
    """Load a trained LoRA (a run dir, a checkpoint folder or the safetensors file) into the policy's
    UNet; returns the folder it came from. A LoRA trained on another model is a ConfigError naming
    the checkpoint, checked before anything is loaded. `ema`: the run's EMA weights (final_ema)."""
    folder = resolve_lora_folder(checkpoint, ema)
    problems = lora_mismatches(policy.denoiser, folder / LORA_WEIGHTS)
    if problems:
        raise ConfigError(
            f"checkpoint={checkpoint}: its LoRA does not fit this model ({len(problems)} mismatch(es), e.g. "
            f"{problems[0]}). Use the model it was trained on: given a run dir, the run's model is used "
            "unless model=... is set on the command line."
        )
    try:
        policy.denoiser.load_lora_adapter(str(folder), prefix=UNET_PREFIX, weight_name=LORA_WEIGHTS)
    except (RuntimeError, ValueError, KeyError) as err:  # what the header check cannot see
        raise ConfigError(f"checkpoint={checkpoint}: its LoRA does not load into this model ({err})") from err
    return folder

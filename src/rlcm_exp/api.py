"""The Python API: train, read what a run recorded, and load its trained policy, from a notebook.

    import rlcm_exp

    records = rlcm_exp.run(["model=tiny", "task=compression", "train.epochs=2"], run_dir="runs/a")
    rec = rlcm_exp.read_records("runs/a")          # {"metrics": [...], "evals": [...], "config": {...}}
    policy = rlcm_exp.load_policy("runs/a")        # the run's sampler-as-policy with its trained LoRA
    images = policy.sample(["a cat"], [torch.Generator().manual_seed(0)]).images  # (1, 3, H, W) in [0, 1]

`run` takes the command line's overrides (the same groups and keys as `python -m rlcm_exp`) and
trains in this process; a run dir holds what the command line's does (config.yaml, metrics.jsonl,
eval.jsonl, checkpoints/, figures), so the commands (evaluate, sample, export, compare) read it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any


def run(overrides: Sequence[str], run_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Train one run, composed from conf/ with `overrides` (e.g. ["model=tiny", "train.epochs=2"]),
    into `run_dir` (or the overrides' `hydra.run.dir=`; default outputs/api/DATE/TIME-US, as the command
    line's outputs/DATE/TIME-US);
    returns the epochs' records (what metrics.jsonl holds). Bad input raises rlcm_exp.errors.ConfigError
    naming the key, before any model loads; resume=auto continues a run dir's newest checkpoint."""
    from omegaconf import OmegaConf

    from rlcm_exp.analysis.summary import RunSummary
    from rlcm_exp.configs import compose, probe_folder
    from rlcm_exp.secrets import redact_override
    from rlcm_exp.training.build import train

    overrides, folder = run_folder(list(overrides), run_dir)
    cfg = compose("config", overrides)
    probe_folder(folder, f"run_dir={folder}")  # read-only, a file in the way, a name too long: one line
    records = train(cfg, folder, callbacks=[RunSummary()])
    overrides_file = folder / ".hydra" / "overrides.yaml"  # where the command line's Hydra keeps them
    if not overrides_file.is_file():  # the training command of the exported model card
        overrides_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create([redact_override(o) for o in overrides]), overrides_file)
    return records


def run_folder(overrides: list[str], run_dir: str | Path | None) -> tuple[list[str], Path]:
    """The overrides without `hydra.run.dir=`, and the run's folder: `run_dir`, else that override,
    else outputs/api/DATE/TIME-US. Two different folders, or a sweep folder, are refused."""
    from rlcm_exp.configs import OUTPUT_DIR_KEYS
    from rlcm_exp.errors import ConfigError

    keys = [o.lstrip("+~").partition("=") for o in overrides]
    if any(key == OUTPUT_DIR_KEYS[1] for key, _, _ in keys):
        raise ConfigError(
            "hydra.sweep.dir: rlcm_exp.run trains one run; call it once per run with run_dir=..."
        )
    named = [value for key, _, value in keys if key == OUTPUT_DIR_KEYS[0]]
    if named and run_dir is not None and Path(named[-1]) != Path(run_dir):
        raise ConfigError(
            f"hydra.run.dir={named[-1]} and run_dir={run_dir} name two folders; give one of them."
        )
    rest = [o for o, (key, _, _) in zip(overrides, keys, strict=True) if key != OUTPUT_DIR_KEYS[0]]
    if run_dir is not None or named:
        return rest, Path(run_dir if run_dir is not None else named[-1])
    return rest, Path("outputs", "api", f"{datetime.now():%Y-%m-%d/%H-%M-%S-%f}")


def read_records(run_dir: str | Path) -> dict[str, Any]:
    """What a run recorded: {"metrics": metrics.jsonl's records (one per epoch), "evals": eval.jsonl's
    (one per held-out evaluation, [] without any), "config": config.yaml as plain dicts}."""
    from omegaconf import OmegaConf

    from rlcm_exp.analysis.runs import read_evals, read_records
    from rlcm_exp.evaluation.runs import load_run_config

    folder = Path(run_dir)
    metrics = folder / "metrics.jsonl"
    return {
        "metrics": read_records(metrics) if metrics.is_file() else [],
        "evals": read_evals(folder),
        "config": OmegaConf.to_container(load_run_config(folder), resolve=True),
    }


def load_policy(run_dir: str | Path, device: str = "cpu") -> Any:
    """The run's policy (its model family, sampler and settings from config.yaml) with the trained LoRA
    (checkpoints/final, else the newest checkpoint) loaded into its UNet. `policy.sample(prompts,
    generators)` draws images; `policy.denoiser` is a diffusers UNet with the LoRA as a PEFT adapter."""
    from rlcm_exp.evaluation.runs import load_lora, load_run_config
    from rlcm_exp.policies.build import build_policy

    folder = Path(run_dir)
    policy = build_policy(load_run_config(folder), device)
    load_lora(policy, folder)
    return policy

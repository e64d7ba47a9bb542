"""What a run dir may hold when a run starts, checked before anything is written into it.

A fresh run never lands on another run (that would overwrite config.yaml and mix metrics); a
resumed run must be the same run (only keys that change no result may differ); and the records
on disk are made consistent with the checkpoint resumed from, or with the fresh start.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlcm_exp.configs import load_saved_config
from rlcm_exp.errors import ConfigError
from rlcm_exp.secrets import REDACTED, redact
from rlcm_exp.tracking import MetricsFile, read_metrics
from rlcm_exp.training.checkpoint import complete_checkpoints, is_complete

RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints")  # present once a run started
RECORD_FILES = ("metrics.jsonl", "eval.jsonl")
# everything else a run writes at its top level (the summary's figures, grids, the tracker's folder):
# a fresh run into a folder that holds one of these (a user's file of the same name) is refused
# rather than overwrite it
RUN_OUTPUTS = (
    "git_commit.txt", "batch_plan.json", "samples", "rollouts", "eval", "reward_vs_time.png",
    "before_after.png", "wandb", "diverged.json",
)  # fmt: skip
# keys a resume may change: the length of the run, where and how fast it runs, what it logs;
# anything else (task, reward, sampler, LoRA, batch sizes, seed, ...) would make it another run
RESUMABLE = (
    "train.epochs", "train.checkpoint_every", "train.keep_last", "train.reward_workers",
    "train.eval_every", "train.save_images", "train.save_images_every", "train.dump_rollouts",
    "train.max_nonfinite_in_a_row", "train.reward_timeout_s", "resume", "device", "logger", "memory",
    "model.memory",  # the memory model's figures: an estimate, no part of what the run computes
)  # fmt: skip


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """Refuse a fresh run into a run dir that holds one or files a run would overwrite, and a resume
    whose config differs."""
    if not holds_run(run_dir):
        clashes = [name for name in RUN_OUTPUTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
        if clashes:
            raise ConfigError(
                f"{run_dir} holds {', '.join(clashes)} but no run (no config.yaml, metrics or checkpoints); "
                "a run would overwrite them. Move them away, or use another hydra.run.dir."
            )
        return
    if cfg.resume in (None, "none", "null", False):
        raise ConfigError(
            f"{run_dir} already holds a run (config.yaml, metrics or checkpoints); a fresh run there would "
            "overwrite it. Continue it with resume=auto, or start a new run in another folder "
            "(hydra.run.dir=NEW_DIR, or leave hydra.run.dir unset for a new timestamped one)."
        )
    for name in RECORD_FILES:  # a damaged record file is refused now, not rewritten on resume
        if (run_dir / name).is_file():
            read_metrics(run_dir / name)
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = load_saved_config(saved_path)
        differing = config_differences(saved if saved is not None else OmegaConf.create(), cfg)
        if differing:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differing[:8])
            raise ConfigError(
                f"resume={cfg.resume} in {run_dir}: the config differs from the run's {saved_path.name} in "
                f"{len(differing)} key(s): {shown}. A resume may change only {', '.join(RESUMABLE)}; "
                "start a new run (another hydra.run.dir) to change anything else."
            )


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            if str(k) != "_partial_":  # set by configs only since the sampler YAML carries it
                out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: node}


def config_differences(saved: Any, current: DictConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every key that differs and that a resume may not change."""
    a = _flat(OmegaConf.to_container(saved, resolve=True))
    b = _flat(OmegaConf.to_container(current, resolve=True))
    return _differences(a, b)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == r or key.startswith(r + ".") for r in RESUMABLE):
            continue
        if REDACTED in (a.get(key), b.get(key)):  # secrets are not saved: nothing to compare
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return out


def run_identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies a new run, carried by each of its checkpoints: a fresh run id and the config
    keys that define the run (every key but those a resume may change; secrets redacted) with their
    hash. A resume compares them with its own config, config.yaml or not."""
    defining = {
        k: v for k, v in _flat(redact(OmegaConf.to_container(cfg, resolve=True))).items() if _defines(k)
    }
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    return {"run_id": uuid.uuid4().hex, "config_sha256": digest, "config": defining}


def _defines(key: str) -> bool:
    return not any(key == r or key.startswith(r + ".") for r in RESUMABLE)


def check_identity(candidates: list[Path], identity: dict[str, Any], run_dir: Path, resume: Any) -> None:
    """Every checkpoint a resume may load belongs to this run: its config's defining keys equal this
    config's (refused naming the keys that differ), and a checkpoint from outside this run dir is of
    the run this run dir holds. Read from each state.json, before anything loads or is written."""
    own = _own_run_id(run_dir) if resume != "auto" else None
    for folder in candidates:
        saved = json.loads((folder / "state.json").read_text()).get("run")
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ConfigError(
                f"resume={resume}: {folder} carries no run identity (written by an older version): it "
                "cannot be shown to be this run's; start a new run (another hydra.run.dir)"
            )
        differing = _differences(saved["config"], identity["config"])
        if differing:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differing[:8])
            raise ConfigError(
                f"resume={resume}: {folder} is a checkpoint of another run: {len(differing)} key(s) differ "
                f"from its config: {shown}. A resume may change only {', '.join(RESUMABLE)}."
            )
        inside = run_dir.resolve() in folder.resolve().parents
        if resume != "auto" and not inside and saved.get("run_id") != own:
            raise ConfigError(
                f"resume={resume}: the checkpoint is of run {saved.get('run_id')} in {folder.parent.parent}, "
                f"not of the run in {run_dir}; continue that run in its own folder "
                f"(hydra.run.dir={folder.parent.parent} resume=auto)"
            )


def _own_run_id(run_dir: Path) -> str | None:
    """The run id the newest readable checkpoint of run_dir carries (None: none)."""
    for state in sorted((run_dir / "checkpoints").glob("*/state.json"), reverse=True):
        try:
            saved = json.loads(state.read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(saved, dict):
            return saved.get("run_id")
    return None


def resume_candidates(resume: Any, run_dir: Path, world_size: int) -> list[Path]:
    """Checkpoints to try, best first: resume=auto gives every complete one of the run dir, newest
    first (a newer one whose files do not load falls back to the one before); a path gives itself."""
    if resume in (None, "none", "null", False):
        return []
    if resume == "auto":
        return list(complete_checkpoints(run_dir, world_size))
    folder = Path(str(resume)).expanduser()
    if not is_complete(folder, world_size):
        raise ConfigError(
            f"resume={resume}: not a complete checkpoint folder (needs COMPLETE, state.json, optimizer.pt, ...). "
            "Use resume=auto to continue the newest complete checkpoint of this run dir."
        )
    return [folder]


def reset_records(run_dir: Path) -> None:
    """A (re)start from scratch: records of an earlier attempt that never checkpointed are dropped,
    so the run's files hold each epoch once."""
    for name in RECORD_FILES:
        MetricsFile(run_dir / name).truncate(lambda record: False)

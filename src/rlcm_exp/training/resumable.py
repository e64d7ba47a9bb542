"""The trainer's checkpoints: what an exact resume needs, written and read back (training/checkpoint.py
holds the files' format). A mixin of `Trainer`, kept apart so that the epoch loop reads on its own."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.lora import load_lora_into
from rlcm_exp.training.checkpoint import checkpoint_dir, read_checkpoint, set_rng_state, write_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

    from rlcm_exp.policies.base import Policy
    from rlcm_exp.tracking import MetricsFile
    from rlcm_exp.training.ema import EMA
    from rlcm_exp.training.rounds import RoundAdvantages
    from rlcm_exp.training.settings import AlgoSettings, TrainSettings
    from rlcm_exp.training.update import Optimization


class Resumable:
    """`state`, `save_checkpoint` and `restore` over the trainer's attributes (declared below)."""

    accelerator: Accelerator
    policy: Policy
    algo: AlgoSettings
    optimization: Optimization
    advantage: RoundAdvantages
    settings: TrainSettings
    run_dir: Path
    rank: int
    epoch: int
    reward_queries: int
    elapsed_s: float
    budget_spent: bool
    logger_run_id: str | None
    run_identity: dict[str, Any] | None
    metrics: MetricsFile
    eval_file: MetricsFile

    @property
    def ema(self) -> EMA | None:
        raise NotImplementedError

    def gpu_hours(self) -> float:
        raise NotImplementedError

    def _budget_reached(self) -> bool:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """Everything besides weights/optimizer that an exact resume needs (sampling and shuffling
        streams derive from (seed, epoch, ...), so the epoch number restores them)."""
        return {
            "epoch": self.epoch,
            "optimizer_steps": self.optimization.steps,
            "reward_queries": self.reward_queries,
            "elapsed_s": self.elapsed_s,
            "gpu_hours": self.gpu_hours(),
            "nonfinite_in_a_row": self.advantage.nonfinite_in_a_row,
            "stat_tracker": self.algo.stat_tracker.state_dict(),
            "reward_normalisation": self.advantage.normalisation.state_dict(),  # per-component trackers
            "logger_run_id": self.logger_run_id,
            "world_size": self.accelerator.num_processes,
            "run": self.run_identity,
        }

    def save_checkpoint(self, rng: dict[str, Any] | None = None) -> Path:
        acc = self.accelerator
        return write_checkpoint(
            checkpoint_dir(self.run_dir, self.epoch),
            is_main=acc.is_main_process,
            rank=self.rank,
            unet=acc.unwrap_model(self.policy.denoiser),
            optimizer=self.optimization.optimizer,
            lr_scheduler=self.optimization.lr_scheduler,
            scaler=acc.scaler,
            state=self.state(),
            barrier=acc.wait_for_everyone,
            keep_last=self.settings.keep_last,
            extra={} if self.ema is None else {"ema": self.ema.state_dict()},
            rng=rng,
        )

    def restore(self, candidates: Sequence[Path], fall_back: bool = True) -> Path | None:
        """Load the first of `candidates` whose files load; a newer checkpoint with a truncated or
        corrupt file is skipped with a warning (fall_back) or refused. Returns the folder used."""
        for folder in candidates:
            try:
                ckpt = read_checkpoint(folder, self.rank, self.accelerator.device)
            except Exception as err:  # torch, safetensors and json each raise their own type
                if not fall_back:
                    raise ConfigError(f"resume={folder}: the checkpoint does not load ({err})") from err
                warnings.warn(
                    f"checkpoint {folder} does not load ({type(err).__name__}: {err}); trying the one before",
                    stacklevel=2,
                )
                continue
            self._apply_checkpoint(folder, ckpt)
            return folder
        return None

    def _apply_checkpoint(self, folder: Path, ckpt: dict[str, Any]) -> None:
        acc = self.accelerator
        state = ckpt["state"]
        if state["world_size"] != acc.num_processes:
            raise RuntimeError(
                f"{folder} was written by {state['world_size']} processes, this run has {acc.num_processes}: "
                "resume with the same number of processes"
            )
        load_lora_into(acc.unwrap_model(self.policy.denoiser), ckpt["lora"])
        self.optimization.optimizer.load_state_dict(ckpt["optimizer"])
        self.optimization.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"] is not None and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ConfigError(f"{folder} holds no EMA weights (ema.pt) but train.ema_decay is set")
            self.ema.load_state_dict(ckpt["ema"])
        self.algo.stat_tracker.load_state_dict(state["stat_tracker"])
        self.advantage.normalisation.load_state_dict(state.get("reward_normalisation", {}))
        self.epoch, self.optimization.steps = state["epoch"], state["optimizer_steps"]
        self.reward_queries, self.elapsed_s = state["reward_queries"], state["elapsed_s"]
        self.budget_spent = self._budget_reached()
        self.advantage.nonfinite_in_a_row, self.logger_run_id = (
            state["nonfinite_in_a_row"],
            state["logger_run_id"],
        )
        self.run_identity = state.get("run", self.run_identity)
        if acc.is_main_process:  # records past the checkpoint will be written again, identically
            for f in (self.metrics, self.eval_file):
                f.truncate(lambda r: r.get("epoch", r.get("epochs_done", 0) - 1) < self.epoch)

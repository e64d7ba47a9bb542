"""Hooks into `Trainer.fit`: observers (benchmarks, custom logging) that never change the run.

Subclass `Callback` and override the hooks you need; every hook is a no-op by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# hooks receive the running rlcm_exp.training.trainer.Trainer; typed Any so this module stays a leaf
Trainer = Any


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the base model's held-out evaluation and the first epoch (models built, LoRA attached)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before sampling epoch `epoch`."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        """After epoch `epoch`'s record is written to metrics.jsonl (evaluation included)."""

    def on_evaluation(self, trainer: Trainer, epochs_done: int, result: dict[str, Any]) -> None:
        """After a held-out evaluation on the main process (`evaluate_policy`'s result: its numbers,
        per-prompt means and grid images), `epochs_done` epochs into the run (0: the base model)."""

    def on_checkpoint(self, trainer: Trainer, folder: Path, seconds: float) -> None:
        """After a checkpoint (or the final LoRA, checkpoints/final) was written, taking `seconds`."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """After the final LoRA is written, before the run's summary."""

"""Where metrics go: always a local metrics.jsonl (the single source for reports), optionally wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """logger=none: nothing leaves the run dir."""

    def start(self, run_dir: Path, config: dict[str, Any], run_name: str) -> NullLogger:
        return self

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """logger=wandb. Offline automatically when no credentials are configured (sync later with `wandb sync`)."""

    def __init__(self, project: str, entity: str | None, group: str | None, tags: list[str], mode: str) -> None:
        self.project, self.entity, self.group, self.tags, self.mode = project, entity, group, list(tags), mode
        self.run: Any = None

    def start(self, run_dir: Path, config: dict[str, Any], run_name: str) -> WandbLogger:
        import wandb

        mode = self.mode
        if mode == "auto":
            has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
            mode = "online" if has_key else "offline"
            if mode == "offline":
                print(f"wandb: no credentials found, logging offline; sync later with `wandb sync {run_dir}/wandb`")
        self.run = wandb.init(
            project=self.project, entity=self.entity, group=self.group, tags=self.tags, mode=mode,
            dir=str(run_dir), config=config, name=run_name,
        )
        for axis in ("epoch", "wallclock_s", "gpu_hours", "reward_queries"):
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="epoch")
        return self

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics)

    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        import wandb

        pics = [wandb.Image(img.permute(1, 2, 0).numpy(), caption=c) for img, c in zip(images, captions, strict=True)]
        self.run.log({key: pics, "epoch": step})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def null_logger() -> NullLogger:
    return NullLogger()


def wandb_logger(
    project: str = "rlcm-exp", entity: str | None = None, group: str | None = None,
    tags: list[str] | None = None, mode: str = "auto",
) -> WandbLogger:
    return WandbLogger(project, entity, group, tags or [], mode)


class MetricsFile:
    """Append-only JSON lines, one object per epoch; each line flushed so a crash loses at most one epoch."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]

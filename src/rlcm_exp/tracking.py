"""Where metrics go: always a local metrics.jsonl (the single source for reports), optionally wandb."""

from __future__ import annotations

import json
import netrc
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlparse

import numpy as np
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import to_uint8


class Logger(Protocol):
    """What the trainer logs to (logger=none | wandb); metrics.jsonl is written besides, always."""

    def start(
        self, run_dir: Path, config: dict[str, Any], run_name: str, resume_id: str | None = None
    ) -> Logger:
        """Open the tracker's run; `resume_id` (a checkpoint's `run_id`) continues that run."""
        ...

    @property
    def run_id(self) -> str | None:
        """The tracker's id of the open run (checkpointed, so a resume continues it); None: none."""
        ...

    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None: ...
    def finish(self) -> None: ...


class NullLogger:
    """logger=none: nothing leaves the run dir."""

    def start(
        self, run_dir: Path, config: dict[str, Any], run_name: str, resume_id: str | None = None
    ) -> NullLogger:
        return self

    @property
    def run_id(self) -> str | None:
        return None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


# The x-axes every scalar can be plotted against (each record carries all four).
TIME_AXES = ("epoch", "wallclock_s", "gpu_hours", "reward_queries")
WANDB_MODES = ("online", "offline", "disabled", "shared")  # what wandb.init accepts


def wandb_has_credentials(environ: Mapping[str, str] | None = None) -> bool:
    """True when wandb could log online: WANDB_API_KEY, or a ~/.netrc entry for the wandb host."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(env.get("NETRC", Path.home() / ".netrc")).expanduser()
    try:
        # a netrc without an entry for the wandb host (e.g. only a git host) is not a wandb login
        return netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str, environ: Mapping[str, str] | None = None) -> str:
    """mode=auto -> WANDB_MODE if set, else online with credentials, offline without; others pass through."""
    env = os.environ if environ is None else environ
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    return "online" if wandb_has_credentials(env) else "offline"


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) floats in [0, 1] -> (H, W, C) uint8. wandb.Image casts floats with astype(uint8),
    which turns a [0, 1] image black, so the conversion is done here (the project's one conversion)."""
    return to_uint8(image)


class WandbLogger:
    """logger=wandb. Offline automatically when no credentials are configured (sync later with `wandb sync`)."""

    def __init__(
        self, project: str, entity: str | None, group: str | None, tags: list[str], mode: str
    ) -> None:
        self.project, self.entity, self.group, self.tags, self.mode = project, entity, group, list(tags), mode
        self.run: Any = None
        self._pending: dict[
            str, tuple[list[Any], int]
        ] = {}  # key -> (images, epoch) waiting for the next record

    def start(
        self, run_dir: Path, config: dict[str, Any], run_name: str, resume_id: str | None = None
    ) -> WandbLogger:
        import wandb  # here, not at module level: logger=none must not even import wandb

        mode = resolve_wandb_mode(self.mode)
        if mode not in WANDB_MODES:
            raise ConfigError(
                f"logger.mode={self.mode!r} (or WANDB_MODE) is not one of auto, {', '.join(WANDB_MODES)}"
            )
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            tags=self.tags,
            mode=cast(Any, mode),
            dir=str(run_dir),
            config=config,
            name=run_name,
            # a resumed run continues its wandb run (the id its checkpoint holds)
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        if mode == "offline":
            # run.dir is <run_dir>/wandb/offline-run-*/files; sync takes the offline-run folder
            print(
                "wandb: no credentials configured (WANDB_API_KEY or `wandb login`), logged offline; "
                f"upload later with `wandb sync {Path(self.run.dir).parent}`"
            )
        # every record carries all time axes; epoch is the default x, the others are selectable in the UI
        for axis in TIME_AXES:
            self.run.define_metric(axis)
        self.run.define_metric("*", step_metric="epoch")
        return self

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else str(self.run.id)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        # only scalars (per-prompt dicts live in the local jsonl files); pending images join this row,
        # so they carry the record's time axes too
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float | bool)}
        self.run.log({**{k: pics for k, (pics, _) in self._pending.items()}, **row})
        self._pending = {}

    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        """Images wait for the next `log` (the epoch's record) and share its row, time axes included; a
        second batch under a waiting key first logs the waiting one in a row of its own."""
        import wandb

        if key in self._pending:
            self._flush(key)
        pics = [wandb.Image(to_uint8_hwc(img), caption=c) for img, c in zip(images, captions, strict=True)]
        self._pending[key] = (pics, step)

    def _flush(self, key: str) -> None:
        pics, epoch = self._pending.pop(key)
        self.run.log({key: pics, "epoch": epoch})

    def finish(self) -> None:
        if self.run is not None:
            for key in list(self._pending):
                self._flush(key)
            self.run.finish()
            self.run = None


def null_logger(
    project: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str | None = None,
) -> NullLogger:
    """logger=none. Accepts (and ignores) the wandb settings, so that overlays setting logger.group or
    logger.tags (experiment=paper/...) also run without wandb; any other key is still an error."""
    return NullLogger()


def wandb_logger(
    project: str = "rlcm-exp",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    mode: str = "auto",
) -> WandbLogger:
    return WandbLogger(project, entity, group, tags or [], mode)


DIVERGED_FILE = "diverged.json"  # in a run dir whose run diverged: {"epoch": N, "what": [...], "message"}


def mark_diverged(run_dir: Path, epoch: int, bad: list[str], message: str) -> None:
    (run_dir / DIVERGED_FILE).write_text(json.dumps({"epoch": epoch, "what": bad, "message": message}) + "\n")


def diverged_at(run_dir: Path) -> int | None:
    """The epoch at which the run in run_dir diverged, None if it did not."""
    path = Path(run_dir) / DIVERGED_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # a damaged marker still marks the run


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

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the records `keep` accepts (resume drops epochs past the checkpoint); atomic rewrite."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if keep(r)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A torn last line (a kill mid-write leaves it half written) is
    dropped with a warning, so a resume rewrites it whole; a bad line anywhere else is damage, not a
    torn write: ConfigError naming the file and the line."""
    records, torn = [], None
    with Path(path).open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if torn is not None:
                raise ConfigError(
                    f"{path}: line {torn} is not a JSON record and is not the last line, so it is damage "
                    "(an edit, a disk error), not a write cut short by a kill; restore the file or remove the line"
                )
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                torn = number
    if torn is not None:
        warnings.warn(f"{path}: line {torn} is torn (a write was interrupted); dropped", stacklevel=2)
    return records

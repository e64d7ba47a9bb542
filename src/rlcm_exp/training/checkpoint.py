"""The full training state of a run, for an exact resume: LoRA, optimizer, RNGs, counters.

Each checkpoint folder is written under a temporary name and renamed into place after a COMPLETE
marker, so a crash or a full disk never leaves a half-written checkpoint where resume would read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlcm_exp.errors import CheckpointError, ConfigError
from rlcm_exp.models.lora import write_lora_weights

# ----------------------------------------------------------------------------- full training state
#
# RUN_DIR/checkpoints/epoch_000012/
#   pytorch_lora_weights.safetensors   LoRA (diffusers format; pipe.load_lora_weights loads it)
#   optimizer.pt, lr_scheduler.pt, scaler.pt   tensors + plain containers (torch.load weights_only=True)
#   rng_rank{r}.pt                     python / numpy / torch CPU / CUDA RNG of each process
#   state.json                         epoch, counters, time offsets, per-prompt buffers, wandb id
#   ema.pt                             EMA of the LoRA weights (train.ema_decay set), tensors only
#   checksums.json                     sha256 of every file above: a damaged file is detected, not loaded
#   COMPLETE                           written last, before the atomic rename


CHECKPOINT_PREFIX = "epoch_"
CHECKSUMS = "checksums.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder (but the checksums and the COMPLETE marker)."""
    return {
        p.name: _sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name not in (CHECKSUMS, "COMPLETE")
    }


def verify_checksums(folder: Path) -> None:
    """Raise CheckpointError naming the first file of `folder` whose bytes are not those written (or
    that is missing, or unlisted): a flipped bit or a truncated file is never loaded."""
    try:
        listed = json.loads((folder / CHECKSUMS).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / CHECKSUMS} is missing or unreadable ({err})") from err
    found = checksums(folder)
    for name in sorted(set(listed) | set(found)):
        if listed.get(name) != found.get(name):
            what = "missing" if name not in found else "not listed" if name not in listed else "changed"
            raise CheckpointError(
                f"{folder / name}: checksum mismatch ({what} since the checkpoint was written)"
            )


def rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors and plain numbers, so it loads with weights_only=True."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{epoch:06d}"


def write_checkpoint(
    folder: Path,
    *,
    is_main: bool,
    rank: int,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    state: dict[str, Any],
    barrier: Any,
    keep_last: int,
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write every process's part into folder.tmp, then (main process) mark complete and rename.

    A crash at any point leaves either the previous checkpoints only, or a `.tmp` folder that no
    loader reads; `barrier` synchronises the processes (accelerator.wait_for_everyone). `extra`:
    more main-process parts, each written as NAME.pt (tensors and plain containers only). `rng`: the
    RNG state to save (default: this moment's; a preemption mid-epoch saves the epoch start's).
    """
    tmp = folder.with_name(folder.name + ".tmp")
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save(rng_state() if rng is None else rng, tmp / f"rng_rank{rank}.pt")
        if is_main:
            write_lora_weights(unet, tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), tmp / "scaler.pt")
            (tmp / "state.json").write_text(json.dumps(state))
            for name, value in (extra or {}).items():
                torch.save(value, tmp / f"{name}.pt")
        barrier()
        if is_main:
            (tmp / CHECKSUMS).write_text(json.dumps(checksums(tmp), indent=1))
            (tmp / "COMPLETE").write_text("ok\n")
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
            _prune(folder.parent, keep_last)
    except (
        Exception
    ) as err:  # OSError from files, RuntimeError from torch.save, SafetensorError: all "not written"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {folder}: {err}. The previous checkpoint (if any) is untouched; "
            "free space or fix permissions, then resume with resume=auto."
        ) from err
    return folder


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def is_complete(folder: Path, world_size: int) -> bool:
    needed = ["COMPLETE", "state.json", "optimizer.pt", "lr_scheduler.pt", "pytorch_lora_weights.safetensors"]
    needed += [f"rng_rank{r}.pt" for r in range(world_size)]
    if not all((folder / n).is_file() for n in needed):
        return False
    try:
        json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def check_checkpoint_folders(run_dir: Path) -> None:
    """Refuse, before anything loads, a run dir whose checkpoints/ (or a checkpoint in it: epoch_N,
    final, final_ema) is a file or a link instead of a folder: the run could neither resume from it nor
    write its checkpoints there."""
    root = run_dir / "checkpoints"
    entries = [root] if os.path.lexists(root) and (root.is_symlink() or not root.is_dir()) else []
    if root.is_dir() and not entries:
        names = (
            p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) or p.name.startswith("final")
        )
        entries = [p for p in names if not p.name.endswith(".tmp") and (p.is_symlink() or not p.is_dir())]
    if entries:
        raise ConfigError(
            f"{entries[0]}: a checkpoint folder was replaced by a file or a link; the run can neither resume "
            "from it nor write its checkpoints there. Move it away (or choose another hydra.run.dir)."
        )


def complete_checkpoints(run_dir: Path, world_size: int) -> Iterator[Path]:
    """Complete checkpoints under run_dir/checkpoints, newest first; torn or partial ones are skipped
    with a warning."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    for folder in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"), reverse=True):
        if folder.name.endswith(".tmp") or not folder.is_dir():
            continue
        if is_complete(folder, world_size):
            yield folder
        else:
            warnings.warn(f"skipping torn or partial checkpoint {folder}", stacklevel=2)


def latest_checkpoint(run_dir: Path, world_size: int) -> Path | None:
    """Newest complete checkpoint under run_dir/checkpoints (torn or partial ones skipped), if any."""
    return next(complete_checkpoints(run_dir, world_size), None)


def read_checkpoint(folder: Path, rank: int, device: torch.device) -> dict[str, Any]:
    """Load (never unpickle arbitrary objects: weights_only=True) the parts of a complete checkpoint,
    once their checksums match (CheckpointError otherwise)."""
    from safetensors.torch import load_file

    verify_checksums(folder)

    def load(name: str) -> Any:
        return torch.load(folder / name, map_location=device, weights_only=True)

    return {
        "lora": load_file(folder / "pytorch_lora_weights.safetensors"),
        "optimizer": load("optimizer.pt"),
        "lr_scheduler": load("lr_scheduler.pt"),
        "scaler": load("scaler.pt") if (folder / "scaler.pt").is_file() else None,
        "rng": torch.load(folder / f"rng_rank{rank}.pt", weights_only=True),
        "state": json.loads((folder / "state.json").read_text()),
        "ema": load("ema.pt") if (folder / "ema.pt").is_file() else None,
    }

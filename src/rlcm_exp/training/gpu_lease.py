"""One GPU per concurrent job of a sweep (`hydra/launcher=gpu_parallel device=job`): a lease.

Job number mod GPU count is wrong as soon as jobs finish out of order: with 2 GPUs, jobs 0 and 1
start; job 1 finishes, job 2 starts on GPU 0, beside job 0, while GPU 1 idles. Instead each job
takes the first free slot of the N GPUs: slot i is an exclusive `fcntl.flock` on FOLDER/gpu-i.lock,
held for the job's life and released when it ends; the kernel releases it too when the process
dies (a crash, SIGKILL), so no lease outlives its job. A job that finds every slot taken waits for
one (a sweep with more concurrent jobs than GPUs queues), printing once that it waits; with a
`timeout_s` it stops with one line instead. The folder is the sweep's own (shared by its jobs);
two sweeps running at once on one machine share GPUs only if both name one folder in
`RLCM_EXP_GPU_LEASE_DIR`.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rlcm_exp.errors import ConfigError

LEASE_DIR_ENV = "RLCM_EXP_GPU_LEASE_DIR"  # a folder shared by every sweep on the machine (optional)


def _try_slot(folder: Path, slot: int) -> int | None:
    """The open, locked descriptor of slot `slot`, or None when another job holds it."""
    fd = os.open(folder / f"gpu-{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def gpu_lease(folder: Path, slots: int, timeout_s: float | None = None, poll_s: float = 0.1) -> Iterator[int]:
    """Hold the first free of `slots` GPU slots leased in `folder` for the `with` block; yields its
    index. Waits while all are held (None: as long as it takes), else raises ConfigError."""
    if slots < 1:
        raise ConfigError("device=job needs at least one visible CUDA GPU (CUDA_VISIBLE_DEVICES)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the GPU lease folder {folder} ({LEASE_DIR_ENV}): {err}") from err
    start, told = time.monotonic(), False
    while True:
        for slot in range(slots):
            fd = _try_slot(folder, slot)
            if fd is not None:
                try:
                    yield slot
                finally:
                    os.close(fd)  # closing the descriptor releases the lock
                return
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            raise ConfigError(
                f"device=job: all {slots} GPU(s) leased in {folder} by other jobs for {waited:.0f} s; "
                "lower hydra.launcher.n_jobs to the GPU count"
            )
        if not told:
            told = True
            print(f"device=job: all {slots} GPU(s) leased in {folder}; waiting for one", file=sys.stderr)
        time.sleep(poll_s)


def lease_folder(sweep_dir: str | Path) -> Path:
    """Where a sweep's jobs lease GPUs: $RLCM_EXP_GPU_LEASE_DIR, else SWEEP_DIR/.gpu_leases."""
    shared = os.environ.get(LEASE_DIR_ENV)
    return Path(shared) if shared else Path(sweep_dir) / ".gpu_leases"

"""One process owns a run dir: an exclusive lock on RUN_DIR/.rlcm-exp.lock for the run's life.

The lock is `fcntl.flock` on an open file: the kernel releases it when the process dies (SIGKILL,
OOM, a node reboot), so a dead run never leaves a stale lock behind and nothing has to be cleaned
up by hand. A second run, or a second `resume=auto`, into a locked run dir is refused with one line
naming the holder. The lock is re-entrant within a process (the entry point takes it before Hydra
writes into the folder, `train` takes it again), so each of them can hold it without knowing the
other. A start that fails before its run began removes the lock file if it created it, while still
holding the lock; `acquire` checks after locking that the file it locked is still the one at the
path (else it locks again), so a removed lock file never lets two processes own one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rlcm_exp.errors import ConfigError

LOCK_NAME = ".rlcm-exp.lock"  # in the run dir; holds the holder's pid, for the refusal message


class RunDirBusy(ConfigError):
    """Another live process holds the run dir's lock."""


@dataclass
class _Held:
    fd: int
    count: int
    created: bool  # this process created the lock file (a failed start removes it again)


_HELD: dict[Path, _Held] = {}  # resolved run dir -> this process's lock on it


def _holder(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def acquire(run_dir: Path) -> Path:
    """Lock `run_dir` (which must exist) for this process, or raise RunDirBusy; returns its resolved
    path, the key `release` takes. Taking it again in the same process only counts."""
    key = run_dir.resolve()
    held = _HELD.get(key)
    if held is not None:
        held.count += 1
        return key
    lock_path = key / LOCK_NAME
    while True:
        created = not lock_path.exists()
        fd = _lock(key, lock_path)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:  # removed by a failed start between our open and our lock
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[key] = _Held(fd, 1, created)
    return key


def _lock(key: Path, lock_path: Path) -> int:
    try:  # O_CREAT without O_TRUNC: an existing file (a dead run's) is reused, never emptied first
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise ConfigError(
            f"cannot create the run dir's lock file {lock_path} (hydra.run.dir): {err}"
        ) from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(
            f"{key} is in use by a live run ({_holder(lock_path)} holds {LOCK_NAME}); one process per run "
            "dir: wait for it to end (or stop it: SIGTERM checkpoints), or use another hydra.run.dir"
        ) from None
    return fd


def release(key: Path, unstarted: bool = False) -> None:
    """Undo one `acquire`; the last one drops the lock. `unstarted`: the run never began (a failed
    start), so a lock file this process created is removed first, under the lock."""
    held = _HELD[key]
    held.count -= 1
    if held.count == 0:
        del _HELD[key]
        if unstarted and held.created:
            with contextlib.suppress(OSError):
                (key / LOCK_NAME).unlink()
        os.close(held.fd)  # closing the last descriptor drops the flock


def holds(run_dir: Path) -> bool:
    """True when this process holds `run_dir`'s lock."""
    return run_dir.resolve() in _HELD


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the block (RunDirBusy when another process holds it)."""
    key = acquire(run_dir)
    try:
        yield
    except BaseException:
        release(key, unstarted=not (key / "config.yaml").exists())  # config.yaml: written once it starts
        raise
    release(key)

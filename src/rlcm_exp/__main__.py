"""`python -m rlcm_exp [overrides]` (also `rlcm-exp`): train one run. Parsing and exit codes only.

With no overrides this is the paper's RLCM aesthetic run; `experiment=quickstart` runs on a laptop
CPU. See conf/config.yaml for every key; the run itself is `rlcm_exp.training.build.train`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from rlcm_exp.configs import HYDRA_CONFIG_PATH, OUTPUT_DIR_KEYS, check_output_dirs, register_help_resolver
from rlcm_exp.errors import ConfigError, RunStopped, exit_on_config_error
from rlcm_exp.secrets import redact_output
from rlcm_exp.training import runlock

register_help_resolver()  # ${rlcm_options:GROUP} of the --help template (conf/hydra/help/)


@hydra.main(version_base="1.3", config_path=HYDRA_CONFIG_PATH, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()

    def job() -> None:
        with job_gpu(cfg, hc.sweep.dir):
            run_job(cfg, hc)

    exit_on_config_error(job)  # a lease that cannot be taken: one line


@contextlib.contextmanager
def job_gpu(cfg: DictConfig, sweep_dir: str) -> Iterator[None]:
    """device=job (parallel sweep jobs): the job leases a GPU of its own for its life, the first free
    one, whatever order earlier jobs finished in (training/gpu_lease.py)."""
    import torch

    from rlcm_exp.training.gpu_lease import gpu_lease, lease_folder

    if cfg.device != "job" or not torch.cuda.is_available():
        yield
        return
    with gpu_lease(lease_folder(sweep_dir), torch.cuda.device_count()) as slot:
        torch.cuda.set_device(slot)
        yield


def run_job(cfg: DictConfig, hc: Any) -> None:
    """One job: train into Hydra's run dir; exit codes for a preempted or stopped run."""
    from hydra.types import RunMode
    from omegaconf import open_dict

    from rlcm_exp.analysis.summary import RunSummary
    from rlcm_exp.training.build import train
    from rlcm_exp.training.trainer import PREEMPTED_EXIT_CODE, Preempted

    if hc.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        with open_dict(cfg):  # every run of a sweep lands in one wandb group, so their curves overlay
            cfg.logger.group = f"sweep-{Path(hc.sweep.dir).name}"
    run_dir = Path(hc.runtime.output_dir)
    try:
        exit_on_config_error(lambda: train(cfg, run_dir, callbacks=[RunSummary()]))
    except Preempted as err:
        print(str(err), file=sys.stderr)
        hand_back(err.signum)  # submitit (SLURM launcher): its handler requeues the job, which resumes
        sys.exit(PREEMPTED_EXIT_CODE)
    except RunStopped as err:  # diverged, a reward that hung: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except BaseException:  # a config error (SystemExit 2), a bug, Ctrl-C: maybe a run that never started
        if created_by_this_command(run_dir):
            clean_up_unstarted(run_dir, f"{hc.job.name}.log", date_folder=not NAMED_DIR)
        raise


def hand_back(signum: int | None) -> None:
    """Once the checkpoint is written, deliver the stop signal to the handler the training replaced,
    when that is a Python one: submitit's (hydra/launcher=slurm, submitit_local) checkpoints the job's
    submission and requeues it (exiting itself); the requeued job continues with resume=auto."""
    import signal

    if signum is not None and callable(signal.getsignal(signum)):
        signal.raise_signal(signum)


# run dirs (and sweep dirs) named on the command line that existed before this command ran: never
# removed, even when a failed start left only Hydra's files there. None: one could not be told.
PREEXISTING: list[Path] | None = []
CREATED_PARENTS: list[Path] = []  # parents of hydra.run.dir that lock_named_run_dir created
NAMED_DIR = False  # hydra.run.dir or hydra.sweep.dir given: its parent is the user's, never removed
HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}  # what Hydra writes into RUN_DIR/.hydra
# flags after which Hydra runs no job (help, printing the config, a sweep): no run dir to lock early
NO_RUN_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-m", "--multirun", "-sc"}


def note_preexisting_dirs(argv: list[str]) -> list[Path] | None:
    """The folders given as hydra.run.dir / hydra.sweep.dir that already exist (None when one is an
    interpolation, which cannot be resolved before Hydra runs); every other run dir is a new
    timestamped folder that this command creates."""
    found = []
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in OUTPUT_DIR_KEYS:
            continue
        if "${" in value:
            return None
        path = Path(value).expanduser().resolve()
        if os.path.lexists(path):  # False for a name too long: check_output_dirs reports it
            found.append(path)
    return found


def created_by_this_command(run_dir: Path) -> bool:
    if PREEXISTING is None:
        return False
    path = run_dir.resolve()
    return not any(path == p or p in path.parents for p in PREEXISTING)


def lock_named_run_dir(argv: list[str]) -> Path | None:
    """`hydra.run.dir=PATH` given: take PATH's lock (training/runlock.py) before Hydra writes its own
    files there, held until this process ends; a live run there refuses this one with one line, before
    anything of this one is written. (A timestamped run dir is new: `train` takes its lock.)
    Returns the folder locked, if any."""
    if any(a.split("=")[0] in NO_RUN_FLAGS for a in argv):
        return None
    if os.environ.get("RANK", "0") != "0":  # torchrun / accelerate launch: the main process owns the dir
        return None
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hydra.run.dir" and value and "${" not in value:
            folder = Path(value).expanduser().absolute()
            CREATED_PARENTS[:] = [p for p in folder.parents if not p.exists()]  # deepest first
            try:
                folder.mkdir(parents=True, exist_ok=True)  # check_output_dirs probed that it can be
            except OSError as err:
                raise ConfigError(f"hydra.run.dir={value}: the folder cannot be created ({err})") from err
            runlock.acquire(folder)
            return folder
    return None


def clean_up_unstarted(run_dir: Path, job_log: str, date_folder: bool) -> None:
    """remove_if_unstarted under the run dir's lock: never while another process holds it (when two
    starts race into one new folder, the one refused must not delete the folder the other uses)."""
    try:
        key = runlock.acquire(run_dir)
    except ConfigError:  # held by another process, or gone
        return
    try:
        remove_if_unstarted(run_dir, job_log, date_folder)
    finally:
        runlock.release(key)


def remove_if_unstarted(run_dir: Path, job_log: str, date_folder: bool = False) -> None:
    """Remove a run dir that holds nothing but Hydra's own files (.hydra/ and the job log): the run
    never started, and a folder per failed attempt would bury the real runs. Anything else there
    (a config.yaml, metrics, a user's file) keeps the whole folder."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name in (job_log, runlock.LOCK_NAME) and entry.is_file() and not entry.is_symlink():
            continue
        own = entry.name == ".hydra" and entry.is_dir() and not entry.is_symlink()
        if own and all(f.name in HYDRA_FILES and f.is_file() for f in entry.iterdir()):
            continue
        return
    shutil.rmtree(run_dir)
    if date_folder:  # outputs/DATE of the default timestamped run dir, when this left it empty
        with contextlib.suppress(OSError):
            run_dir.parent.rmdir()


def main() -> None:
    global PREEXISTING, NAMED_DIR
    redact_output(sys.argv[1:])  # no secret of the command line in any message, Hydra's banners included
    PREEXISTING = note_preexisting_dirs(sys.argv[1:])  # before anything is created
    NAMED_DIR = any(a.lstrip("+~").startswith(tuple(k + "=" for k in OUTPUT_DIR_KEYS)) for a in sys.argv[1:])
    exit_on_config_error(lambda: check_output_dirs(sys.argv[1:]))
    locked = exit_on_config_error(lambda: lock_named_run_dir(sys.argv[1:]))
    try:
        hydra_main()
    except BaseException:  # a failed start (Hydra refused the overrides, or the job failed)
        if locked is not None:
            key = locked.resolve()
            if created_by_this_command(locked):
                clean_up_unstarted(locked, "", date_folder=False)
                for parent in CREATED_PARENTS:  # as they were: Hydra creates nothing for refused overrides
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            runlock.release(
                key, unstarted=not (locked / "config.yaml").exists()
            )  # a user's folder: our lock file goes
        raise


if __name__ == "__main__":
    main()

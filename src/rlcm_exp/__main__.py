"""`python -m rlcm_exp [overrides]`: compose -> save resolved config -> seed -> build -> train.

With no overrides this is the paper's RLCM aesthetic run; `model=toy task=toy_compression` runs
on a laptop CPU. See conf/config.yaml for every key.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rlcm_exp.batching import plan_batches
from rlcm_exp.checkpoint import is_complete, latest_checkpoint, save_lora
from rlcm_exp.errors import ConfigError
from rlcm_exp.models import attach_lora
from rlcm_exp.rl.stat_tracker import PerPromptStatTracker
from rlcm_exp.summary import write_summary
from rlcm_exp.tracking import NullLogger
from rlcm_exp.train import Trainer

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (untracked run outputs do not count)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=CONF_DIR, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=CONF_DIR,
            timeout=5,
        )
        return (
            out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
            if out.returncode == 0
            else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_reward(reward_cfg: DictConfig, device: torch.device) -> Any:
    """Instantiate the reward. `_target_` may name a builder (returns the callable; gets `device` if it
    takes one) or the reward callable itself, `fn(images, prompts, **kwargs)`, bound to the other keys."""
    import functools
    import inspect

    target = hydra.utils.get_method(reward_cfg._target_)
    params = inspect.signature(target).parameters
    if {"images", "prompts"} <= set(params):  # a user's reward function: bind its options, call it later
        options: dict[str, Any] = OmegaConf.to_container(reward_cfg, resolve=True)  # type: ignore[assignment]
        kwargs = {k: v for k, v in options.items() if not k.startswith("_")}
        return functools.partial(target, **kwargs)
    extra = {"device": str(device)} if "device" in params and "device" not in reward_cfg else {}
    return instantiate(reward_cfg, **extra)


def apply_memory_options(
    policy: Any, gradient_checkpointing: bool, channels_last: bool, compile_unet: bool
) -> None:
    """Memory/speed switches on the policy's UNet; each is off by default and changes no result."""
    if gradient_checkpointing:
        policy.unet.enable_gradient_checkpointing()
        policy.unet.train()  # diffusers only checkpoints in training mode; the UNet has no dropout to switch on
    if channels_last:
        policy.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        policy.unet = torch.compile(policy.unet)


def check_batches(cfg: DictConfig, world_size: int, transitions: int = 1) -> Any:
    t = cfg.train
    return plan_batches(
        world_size=world_size,
        samples_per_epoch=t.samples_per_epoch,
        sample_batch_size=t.sample_batch_size,
        train_batch_size=t.train_batch_size,
        samples_per_step=t.samples_per_step,
        inner_epochs=t.inner_epochs,
        transitions_per_trajectory=transitions,
        timestep_fraction=cfg.algo.timestep_fraction if transitions > 1 else 1.0,
        timestep_window=cfg.algo.timestep_window if transitions > 1 else 1.0,
    )


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume=auto continues


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits with PREEMPTED_EXIT_CODE."""


def shared_run_dir(accelerator: Accelerator, own: Path) -> Path:
    """The main process's run dir on every process (each process's Hydra made its own timestamped one)."""
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([str(own)])[0]
    if Path(chosen) != own and own.is_dir():
        shutil.rmtree(own, ignore_errors=True)  # only Hydra's own files were written there
    return Path(chosen)


def train(cfg: DictConfig, run_dir: Path) -> list[dict[str, Any]]:
    """Run one training job into `run_dir` (the main process's; shared by every process)."""
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    precision = ("no" if cpu else "fp16") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    run_dir = shared_run_dir(accelerator, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_batches(cfg, accelerator.num_processes)  # refuse bad batch arithmetic before any model loads
    resume_from = find_resume(cfg.resume, run_dir, accelerator.num_processes)

    # 1. record what runs: resolved config and code version
    if accelerator.is_main_process:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        (run_dir / "git_commit.txt").write_text(git_commit() + "\n")
    set_seed(cfg.seed, device_specific=True)  # seed + process index

    # 2. build: model family -> policy (sampler over one member) -> LoRA -> reward, prompts, optimizer
    family = instantiate(cfg.model)
    # objects go in through a partial: instantiate() would turn a dataclass kwarg into a config node
    policy = instantiate(cfg.sampler, _partial_=True)(family=family, device=accelerator.device)
    set_seed(cfg.seed, device_specific=True)  # LoRA init must not depend on what loading drew before it
    params = attach_lora(policy.unet, **cfg.algo.lora)
    apply_memory_options(policy, **cfg.memory)
    plan = check_batches(cfg, accelerator.num_processes, policy.num_transitions)
    reward_fn = build_reward(cfg.reward, accelerator.device)
    prompts = instantiate(cfg.task.prompts)
    optimizer = instantiate(cfg.optimizer)(params)
    total_steps = cfg.train.epochs * plan.optimizer_steps_per_epoch
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=cfg.algo.lr_end_factor, total_iters=max(total_steps, 1)
    )
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    settings = instantiate(cfg.train)
    trainer = Trainer(
        policy=policy,
        reward_fn=reward_fn,
        prompts=prompts,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        params=params,
        tracker=PerPromptStatTracker(**cfg.algo.stat_tracker),
        plan=plan,
        settings=settings,
        ppo=instantiate(cfg.algo.ppo),
        accelerator=accelerator,
        run_dir=run_dir,
        seed=cfg.seed,
        logger=None,
        eval_prompts=instantiate(cfg.task.eval_prompts),
    )
    if resume_from is not None:
        trainer.restore(resume_from)
        if accelerator.is_main_process:
            print(f"resumed from {resume_from} at epoch {trainer.epoch}")
    if trainer.logger_run_id:  # continue the same wandb run
        os.environ.setdefault("WANDB_RUN_ID", trainer.logger_run_id)
        os.environ.setdefault("WANDB_RESUME", "allow")
    logger = instantiate(cfg.logger) if accelerator.is_main_process else NullLogger()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    logger.start(run_dir, resolved | {"batch_plan": plan.as_dict()}, run_dir.name)
    trainer.logger = logger
    trainer.logger_run_id = getattr(getattr(logger, "run", None), "id", None)
    if accelerator.is_main_process:
        print(plan.describe())
        print(f"trainable LoRA parameters: {sum(p.numel() for p in params):,}; run dir: {run_dir}")
        (run_dir / "batch_plan.json").write_text(json.dumps(plan.as_dict(), indent=1))
    if trainer.epoch == 0 and trainer._eval_due(0):  # the base model's held-out score: the "before"
        trainer.evaluate(0)

    # 3. train; SIGTERM/SIGUSR1 ask for a checkpoint at the next epoch boundary, then exit
    def request_stop(signum: int, frame: Any) -> None:
        trainer.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    records = []
    try:
        for epoch in range(trainer.epoch, cfg.train.epochs):
            rec = trainer.run_epoch(epoch)
            records.append(rec)
            if accelerator.is_main_process:
                print(
                    f"epoch {epoch}: reward {rec['reward_mean']:.4f} +- {rec['reward_std']:.4f}  "
                    f"kl {rec['approx_kl']:.2e}  clipfrac {rec['clipfrac']:.3f}  ratio_first {rec['ratio_first']:.6f}  "
                    f"t {rec['wallclock_s']:.1f}s"
                )
            stop = trainer.should_stop()
            every = settings.checkpoint_every
            if stop or (every > 0 and trainer.epoch % every == 0) or trainer.epoch == cfg.train.epochs:
                trainer.save_checkpoint()
            if stop:
                raise Preempted(
                    f"stopped by a signal after epoch {epoch}; checkpoint written, resume with resume=auto"
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.close()
        logger.finish()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora(accelerator.unwrap_model(policy.unet), run_dir / "checkpoints" / "final")
        if records:
            print(write_summary(run_dir, trainer.eval_images.get("first"), trainer.eval_images.get("last")))
            print(
                f"plots: {run_dir / 'reward_vs_time.png'}"
                + (
                    f", {run_dir / 'before_after.png'} (top: before, bottom: after)"
                    if len(trainer.eval_images)
                    else ""
                )
            )
    return records


def find_resume(resume: str | None, run_dir: Path, world_size: int) -> Path | None:
    """resume=null: fresh start; auto: the newest complete checkpoint in the run dir, if any; else a path."""
    if resume in (None, "none", "null", False):
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir, world_size)
    folder = Path(str(resume)).expanduser()
    if not is_complete(folder, world_size):
        raise ConfigError(
            f"resume={resume}: not a complete checkpoint folder (needs COMPLETE, state.json, optimizer.pt, ...). "
            "Use resume=auto to continue the newest complete checkpoint of this run dir."
        )
    return folder


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    if cfg.device == "job" and torch.cuda.is_available():  # parallel sweep jobs: job N takes GPU N mod count
        torch.cuda.set_device(int(getattr(hc.job, "num", None) or 0) % torch.cuda.device_count())
    if hc.mode == RunMode.MULTIRUN and "group" in cfg.logger and cfg.logger.group is None:
        with open_dict(cfg):  # every run of a sweep lands in one wandb group, so their curves overlay
            cfg.logger.group = f"sweep-{Path(hc.sweep.dir).name}"
    try:
        train(cfg, Path(hc.runtime.output_dir))
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)


def find_config_error(err: BaseException | None) -> ConfigError | None:
    """The ConfigError behind an exception, if any (Hydra's instantiate wraps what builders raise)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()

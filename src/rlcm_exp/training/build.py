"""The composition root: a composed config -> the objects of one run -> `Trainer.fit`.

Every object comes from `instantiate` on its config group (model, sampler, algo, memory, reward,
task prompts, optimizer, train, logger); this module only wires them, in an order that keeps
fixed-seed runs reproducible (the LoRA init draws from a freshly seeded RNG, after loading).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import ModelFamily, check_resolution
from rlcm_exp.models.precision import Precision, apply_tf32, resolve_precision
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.build import build_policy
from rlcm_exp.policies.members import sampler_member
from rlcm_exp.provenance import git_commit
from rlcm_exp.rewards.base import build_reward
from rlcm_exp.rl.multi_reward import RewardNormalisation, SumOfRewards
from rlcm_exp.secrets import redact, redact_run_dir
from rlcm_exp.tracking import Logger, NullLogger
from rlcm_exp.training.batching import BatchPlan, check_groups, check_round_fits, plan_batches
from rlcm_exp.training.callbacks import Callback
from rlcm_exp.training.checkpoint import check_checkpoint_folders
from rlcm_exp.training.ema import EMA
from rlcm_exp.training.failures import RankFailures
from rlcm_exp.training.memory_check import (
    check_training_memory,
    free_memory,
    stated_transitions,
    transitions_cap,
)
from rlcm_exp.training.rundir import (
    check_identity,
    check_run_dir,
    reset_records,
    resume_candidates,
    run_identity,
)
from rlcm_exp.training.runlock import run_dir_lock
from rlcm_exp.training.settings import AlgoSettings, TrainSettings
from rlcm_exp.training.trainer import Preempted, Trainer
from rlcm_exp.training.update import Optimization
from rlcm_exp.validation import check_before_loading, locate


def check_batches(cfg: DictConfig, world_size: int, transitions: int = 1) -> BatchPlan:
    """The batch plan, or a ConfigError naming the keys; with transitions=1 (before the policy
    exists) only the sizes are checked."""
    t = cfg.train
    loss = cfg.algo.get("loss")
    pairs = bool(loss is not None and getattr(locate(loss._target_), "needs_log_ratio_totals", False))
    check_groups(cfg.algo.get("group_size", 1), t.sample_batch_size, t.train_batch_size, pairs)
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
        transitions_per_forward=stated_transitions(t) if transitions > 1 else 1,
    )


def shared_run_dir(accelerator: Accelerator, own: Path) -> Path:
    """The main process's run dir on every process (each process's Hydra made its own timestamped one)."""
    if accelerator.num_processes == 1:
        return own
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([str(own)])[0]
    if Path(chosen) != own and own.is_dir():
        shutil.rmtree(own, ignore_errors=True)  # only Hydra's own files were written there
    return Path(chosen)


def run_precision(cfg: DictConfig) -> Precision:
    """The run's precision (models/precision.py), checked before any model loads; a resolved
    model.dtype=auto is written back into cfg.model, so the family loads what the run trains in."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    dtype = cfg.model.get("dtype") if "model" in cfg else None
    precision = resolve_precision(cfg.mixed_precision, dtype, cuda, bool(cfg.get("tf32", True)))
    if dtype is not None and precision.model_dtype != dtype:
        with open_dict(cfg):
            cfg.model.dtype = precision.model_dtype
    return precision


def make_accelerator(cfg: DictConfig) -> Accelerator:
    """The run's Accelerator; an earlier in-process run's accelerate state (its mixed precision) is
    dropped first, the process group kept. TF32 on CUDA per `tf32`."""
    precision = run_precision(cfg)
    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    if not cpu:
        apply_tf32(precision.tf32)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision.mixed_precision, cpu=cpu)


def check_round_memory(plan: BatchPlan, policy: Policy, device: torch.device) -> None:
    """The round's trajectories against the free memory of the device that holds them (a policy
    without latent_channels / resolution / vae_scale, a user's own, is not estimated)."""
    try:
        side = policy.resolution // policy.vae_scale  # type: ignore[attr-defined]
        elements = policy.latent_channels * side * side  # type: ignore[attr-defined]
    except AttributeError:
        return
    check_round_fits(plan, elements, policy.resolution, free_memory(device))  # type: ignore[attr-defined]


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    accelerator: Accelerator,
    callbacks: Sequence[Callback] = (),
    logger: Logger | None = None,
    transitions_cap: int | None = None,
) -> Trainer:
    """model -> policy -> LoRA -> memory options -> batch plan -> reward, prompts, optimizer, schedule.
    `logger` is built by the caller (not started: `train` starts it once a resume has named its run);
    `transitions_cap`: the memory model's most transitions per call (train.transitions_per_forward=auto)."""
    set_seed(cfg.seed, device_specific=True)  # seed + process index
    policy = build_policy(cfg, accelerator.device)
    set_seed(cfg.seed, device_specific=True)  # LoRA init must not depend on what loading drew before it
    algo: AlgoSettings = instantiate(cfg.algo)
    params = algo.lora.attach(policy.denoiser)
    instantiate(cfg.memory).apply(policy)
    if policy.num_transitions == 0:
        raise ConfigError(
            f"sampler={cfg.sampler._target_.rsplit('.', 1)[-1]} makes no step stochastic (a noise level or eta "
            "of 0), so there is no transition to train: raise sampler.noise_level / sampler.eta"
        )
    plan = check_batches(cfg, accelerator.num_processes, policy.num_transitions)
    check_round_memory(plan, policy, accelerator.device)  # before the first round allocates it
    reward_fn = build_reward(cfg.reward, accelerator.device)
    prompts = instantiate(cfg.task.prompts)
    optimizer = instantiate(cfg.optimizer)(params)
    settings: TrainSettings = instantiate(cfg.train)
    lr_scheduler = algo.lr_schedule(optimizer, settings.epochs * plan.optimizer_steps_per_epoch)
    ema = EMA(params, settings.ema_decay) if settings.ema_decay is not None else None
    gold = cfg.get("gold_reward")
    normalisation = reward_normalisation(cfg, reward_fn, algo)
    policy.denoiser, optimizer = accelerator.prepare(policy.denoiser, optimizer)
    optimization = Optimization(accelerator, optimizer, lr_scheduler, params, settings.max_grad_norm, ema)
    # Trainer(policy, algo, reward, prompts, optimization, plan, settings, accelerator, run_dir, seed, ...)
    return Trainer(
        *(policy, algo, reward_fn, prompts, optimization, plan, settings, accelerator, run_dir, cfg.seed),
        logger=NullLogger() if logger is None else logger,
        eval_prompts=instantiate(cfg.task.eval_prompts),
        callbacks=callbacks,
        gold_reward_fn=build_reward(gold, accelerator.device) if gold is not None else None,
        normalisation=normalisation,
        run_identity=run_identity(cfg),
        transitions_cap=transitions_cap,
    )


def reward_normalisation(cfg: DictConfig, reward_fn: Any, algo: AlgoSettings) -> RewardNormalisation:
    """The config's reward_normalisation (sum when absent, e.g. a config saved before it existed),
    bound to the reward (its weights) and the algo's tracker settings."""
    spec = cfg.get("reward_normalisation")
    chosen: RewardNormalisation = SumOfRewards() if spec is None else instantiate(spec)
    return chosen.bind(reward_fn, algo.stat_tracker)


def build_logger(cfg: DictConfig, accelerator: Accelerator) -> Logger:
    """The tracker (logger=wandb | none) on the main process, a NullLogger on the others; not started."""
    logger: Logger = instantiate(cfg.logger) if accelerator.is_main_process else NullLogger()
    return logger


def start_logger(cfg: DictConfig, trainer: Trainer) -> None:
    """Start the trainer's tracker; a resumed run continues its tracker run (the id its checkpoint holds)."""
    config = resolved_config(cfg) | {"batch_plan": trainer.plan.as_dict()}
    trainer.logger.start(trainer.run_dir, config, trainer.run_dir.name, resume_id=trainer.logger_run_id)
    trainer.logger_run_id = trainer.logger.run_id


def train(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> list[dict[str, Any]]:
    """Run one training job into `run_dir` (the main process's; shared by every process)."""
    check_before_loading(cfg)  # types, ranges, `_target_`s and prompt files, before anything loads
    # a family built from configs (tiny_*) writes its folders now, before the process group exists:
    # transformers' save_pretrained writes nothing on a rank other than 0 of an initialised group
    family = instantiate(cfg.model)
    accelerator = make_accelerator(cfg)
    run_dir = shared_run_dir(accelerator, run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run dir {run_dir} (hydra.run.dir): {err}") from err
    failures = RankFailures(run_dir, accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1:
        if accelerator.is_main_process:
            failures.clear()  # an earlier attempt's lines
        accelerator.wait_for_everyone()
        failures.watch()  # another rank's failure ends this process with its one line
    try:
        # one process owns a run dir for the run's life (the main one; the others share its folder)
        with run_dir_lock(run_dir) if accelerator.is_main_process else nullcontext():
            return _train(cfg, run_dir, accelerator, callbacks, family)
    except Preempted:
        raise  # every rank stops together (the stop request is gathered)
    except Exception as err:
        if accelerator.num_processes > 1:
            failures.report(err)
        raise
    finally:
        failures.stop()


def _train(
    cfg: DictConfig,
    run_dir: Path,
    accelerator: Accelerator,
    callbacks: Sequence[Callback],
    family: ModelFamily,
) -> list[dict[str, Any]]:
    """`train` once the run dir is this process's: checks, build, resume, fit (`family`: cfg.model,
    its folders already built)."""
    check_batches(cfg, accelerator.num_processes)  # refuse bad batch arithmetic before any model loads
    # the image size against the VAE's factor, read from the member's config: no weights load
    member = sampler_member(cfg.sampler)
    check_resolution(family, member, cfg.sampler.get("resolution"))
    # the training call's estimate (weights + saved activations) against the device: no weights load
    check_training_memory(cfg, family, member, accelerator.mixed_precision, accelerator.device)
    check_run_dir(cfg, run_dir)  # a fresh run never lands on another; a resume must be the same run
    check_checkpoint_folders(run_dir)  # checkpoints/ or a checkpoint in it replaced by a file: one line
    candidates = resume_candidates(cfg.resume, run_dir, accelerator.num_processes)
    # each checkpoint a resume may load is this run's, config.yaml or not (refused naming the keys)
    check_identity(candidates, run_identity(cfg), run_dir, cfg.resume)
    if accelerator.is_main_process:
        redact_run_dir(run_dir)  # Hydra's own copies hold the secrets until then, even if the build fails
    cap = transitions_cap(cfg, family, member, accelerator.mixed_precision, accelerator.device)
    trainer = build_trainer(cfg, run_dir, accelerator, callbacks, build_logger(cfg, accelerator), cap)
    if accelerator.is_main_process:  # only once everything is built: a failed start writes nothing here
        record_run(cfg, run_dir)
    resumed = trainer.restore(candidates, fall_back=cfg.resume == "auto")
    if resumed is not None and accelerator.is_main_process:
        print(f"resumed from {resumed} at epoch {trainer.epoch}")
    elif accelerator.is_main_process:
        reset_records(run_dir)  # a restart before the first checkpoint: its rows are written again
    start_logger(cfg, trainer)
    if accelerator.is_main_process:
        print(trainer.plan.describe())
        print(f"trainable LoRA parameters: {sum(p.numel() for p in trainer.params):,}; run dir: {run_dir}")
        (run_dir / "batch_plan.json").write_text(json.dumps(trainer.plan.as_dict(), indent=1))
    return trainer.fit()


def record_run(cfg: DictConfig, run_dir: Path) -> None:
    """What runs: the resolved config (secrets redacted, here and in Hydra's own copies) and the code."""
    try:
        OmegaConf.save(OmegaConf.create(resolved_config(cfg)), run_dir / "config.yaml")
        (run_dir / "git_commit.txt").write_text(git_commit() + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write the run dir {run_dir} (hydra.run.dir): {err}") from err
    redact_run_dir(run_dir)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, every secret-looking value redacted."""
    return redact(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[no-any-return]

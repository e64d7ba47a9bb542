"""What the GPU check runs: each paper task's per-GPU settings, the variants, the Hydra overrides.

The paper configs (conf/paper/{algo}_{task}.yaml) state sizes globally for the reference's GPU
count; one GPU of that run sees `samples_per_epoch / gpus` trajectories per round, sampled in
batches of `sample_batch_size` and trained in minibatches of `train_batch_size`, with
`samples_per_step / gpus` of them per optimizer step. A *short round* is one sampling batch of
those sizes (one optimizer step on it); its phases are scaled to the per-GPU round in the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rlcm_exp.configs import compose

# GPUs of the reference runs (the comments of conf/paper/*.yaml): RLCM 4 (prompt alignment 3 + 1
# reward server), DDPO 8 (prompt alignment 6 + 2 reward servers)
REFERENCE_GPUS: dict[str, dict[str, int]] = {
    "rlcm": {"aesthetic": 4, "compression": 4, "incompression": 4, "prompt_alignment": 3},
    "ddpo": {"aesthetic": 8, "compression": 8, "incompression": 8, "prompt_alignment": 6},
}
# incompression has compression's sizes, so it is not run twice by default
TASKS = ("aesthetic", "compression", "prompt_alignment")
NATIVE_RESOLUTION = {"rlcm": 768, "ddpo": 512}  # LCM-Dreamshaper-v7 and Dreamshaper-7/SD 1.5
MEMBER = {"rlcm": "lcm", "ddpo": "diffusion"}


@dataclasses.dataclass(frozen=True)
class Variant:
    gradient_checkpointing: bool
    transitions_per_forward: int  # 0 = all trained transitions in one UNet call

    @property
    def name(self) -> str:
        per_call = "all" if self.transitions_per_forward == 0 else str(self.transitions_per_forward)
        return f"ckpt={'on' if self.gradient_checkpointing else 'off'},tpf={per_call}"


# the production default first; the rest in the order they are worth the budget
VARIANTS = (Variant(False, 1), Variant(True, 0), Variant(False, 0), Variant(True, 1))


@dataclasses.dataclass(frozen=True)
class TaskSettings:
    """One GPU's share of a paper run (sizes per process) and the short round actually run."""

    task: str
    algo: str
    gpus: int
    per_gpu_samples: int  # trajectories one GPU samples per round
    sample_batch_size: int
    train_batch_size: int
    per_gpu_samples_per_step: int
    num_steps: int
    guidance_scale: float | None
    resolution: int
    short_samples: int  # trajectories of the short round

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paper_settings(algo: str, task: str, cpu_scale: bool = False) -> TaskSettings:
    """Per-GPU settings of the paper's (algo, task) run: `algo=ALGO task=TASK` composed, so the root
    config's values count where conf/paper/{algo}_{task}.yaml does not restate them.

    `cpu_scale`: batches of 2 and 1, 3 steps, 32 px: the same path in seconds on a CPU."""
    cfg: Any = compose("config", [f"algo={algo}", f"task={task}"])
    gpus = REFERENCE_GPUS[algo][task]
    train, sampler = cfg.train, cfg.sampler
    for key in ("samples_per_epoch", "samples_per_step"):
        if train[key] % gpus:
            raise ValueError(
                f"conf/paper/{algo}_{task}.yaml: train.{key}={train[key]} is not split by {gpus} GPUs"
            )
    guidance = sampler.get("guidance_scale")
    settings = TaskSettings(
        task=task,
        algo=algo,
        gpus=gpus,
        per_gpu_samples=train.samples_per_epoch // gpus,
        sample_batch_size=train.sample_batch_size,
        train_batch_size=train.train_batch_size,
        per_gpu_samples_per_step=train.samples_per_step // gpus,
        num_steps=sampler.num_steps,
        guidance_scale=float(guidance) if guidance is not None else None,
        resolution=NATIVE_RESOLUTION[algo],
        short_samples=train.sample_batch_size,
    )
    if cpu_scale:
        settings = dataclasses.replace(
            settings, sample_batch_size=2, train_batch_size=1, num_steps=3, resolution=32, short_samples=2
        )
    return settings


# --cpu-scale: the tiny members stand in for the full-size ones, so the configuration's memory
# figures (those of the real model, e.g. SD3.5-Medium's 10 GB of fp32 text encoders) describe
# nothing that runs: no estimate
CPU_SCALE_OVERRIDES = ["model.dtype=float32", "device=cpu", "model.memory=null"]


def run_overrides(
    s: TaskSettings, variant: Variant, member: Path, reward: list[str], cuda: bool, warmup: int
) -> list[str]:
    """The Hydra overrides of one short round (after `warmup` unmeasured ones) of `s` in `variant`."""
    per_step = min(s.per_gpu_samples_per_step, s.short_samples)
    overrides = [
        f"algo={s.algo}",
        f"task={s.task}",
        "logger=none",
        "train.eval_every=0",
        f"model.{MEMBER[s.algo]}.local_path={member}",
        f"sampler.num_steps={s.num_steps}",
        f"sampler.resolution={s.resolution}",
        f"train.samples_per_epoch={s.short_samples}",
        f"train.sample_batch_size={s.sample_batch_size}",
        f"train.train_batch_size={s.train_batch_size}",
        f"train.samples_per_step={per_step}",
        f"train.transitions_per_forward={variant.transitions_per_forward}",
        f"memory.gradient_checkpointing={str(variant.gradient_checkpointing).lower()}",
        f"train.epochs={warmup + 1}",
        "train.checkpoint_every=0",
    ]
    if s.guidance_scale is not None:
        overrides.append(f"sampler.guidance_scale={s.guidance_scale}")
    if s.task == "aesthetic":
        overrides += reward
    elif s.task == "prompt_alignment":
        # the LLaVA + BERTScore server runs on its own GPUs in the paper; JPEG stands in for it here
        overrides.append("reward=jpeg_compressibility")
    # fp16 frozen weights, fp32 LoRA (the accelerator's fp16 autocast); SDPA is diffusers' default
    overrides += ["model.dtype=float16", "mixed_precision=fp16"] if cuda else CPU_SCALE_OVERRIDES
    return overrides


def memory_refusal(overrides: list[str], available: float) -> str | None:
    """Why the memory model (rlcm_exp/models/memory.py) says the run of `overrides` cannot fit
    `available` bytes, or None: the check skips such a variant instead of running it out of memory."""
    from hydra.utils import instantiate

    from rlcm_exp.models.memory import refusal
    from rlcm_exp.policies.members import sampler_member
    from rlcm_exp.training.memory_check import training_call

    cfg: Any = compose("config", overrides)
    family = instantiate(cfg.model)
    stated = training_call(cfg, family, sampler_member(cfg.sampler), str(cfg.mixed_precision))
    return None if stated is None else refusal(stated[0], stated[1], available, stated[2])


def round_scale(s: TaskSettings) -> dict[str, float]:
    """Factors from the short round to the per-GPU round: sampling per batch, training per trajectory,
    optimizer per step."""
    per_step = min(s.per_gpu_samples_per_step, s.short_samples)
    return {
        "sampling": s.per_gpu_samples / s.short_samples,
        "training": s.per_gpu_samples / s.short_samples,
        "optimizer": (s.per_gpu_samples / s.per_gpu_samples_per_step) / (s.short_samples / per_step),
    }


# ---------------------------------------------------------------- flow rows (issue 28)


@dataclasses.dataclass(frozen=True)
class FlowSettings(TaskSettings):
    """A full-size random-weight flow round: the model config, the member slot its random weights fill,
    the sampler, and which SD3.5 architecture (full_models.SD35_TRANSFORMERS) is built for it."""

    model: str  # conf/model/<model>.yaml
    member: str  # the slot (diffusion | lcm) whose local_path is the random member
    sampler: str  # conf/sampler/<sampler>.yaml
    architecture: str  # sd35_medium | sd35_large


# (label, algo, sampler, model, member, architecture, steps, guidance, px): Flow-GRPO on SD3.5-Medium at
# Flow-GRPO's 512 px and 10 steps, and RLCM-style few-step training of SD3.5-Large-Turbo (4 steps, no
# CFG, 1024 px native); sampled in batches of 8, trained in minibatches of 2 (conf/config.yaml's sizes)
FLOW_ROUNDS = (
    ("sd35m_flow_grpo", "grpo", "flow_sde", "sd35_medium", "diffusion", "sd35_medium", 10, 4.5, 512),
    ("sd35lt_few_step", "rlcm", "flow_consistency", "sd35_large", "lcm", "sd35_large", 4, 1.0, 1024),
)


def flow_settings(cpu_scale: bool = False) -> list[FlowSettings]:
    """The flow rows' one-GPU short rounds; `cpu_scale`: the tiny SD3.5 members, 3 steps, 32 px,
    batches of 4 (a GRPO group) and 2."""
    rows = []
    for label, algo, sampler, model, member, arch, steps, guidance, px in FLOW_ROUNDS:
        batch, train, steps, px = (4, 2, 3, 32) if cpu_scale else (8, 2, steps, px)
        rows.append(
            FlowSettings(
                task=label,
                algo=algo,
                gpus=1,
                per_gpu_samples=batch,
                sample_batch_size=batch,
                train_batch_size=train,
                per_gpu_samples_per_step=batch,
                num_steps=steps,
                guidance_scale=guidance,
                resolution=px,
                short_samples=batch,
                model=model,
                member=member,
                sampler=sampler,
                architecture=arch,
            )
        )
    return rows


def flow_overrides(s: FlowSettings, variant: Variant, member: Path, cuda: bool, warmup: int) -> list[str]:
    """The Hydra overrides of one flow round: JPEG compressibility as the reward (no reward model), bf16
    weights and autocast on a GPU (SD3.5's release dtype)."""
    return [
        f"model={s.model}",
        f"algo={s.algo}",
        f"sampler={s.sampler}",
        "task=compression",
        "logger=none",
        "train.eval_every=0",
        f"model.{s.member}.local_path={member}",
        f"sampler.num_steps={s.num_steps}",
        f"sampler.guidance_scale={s.guidance_scale}",
        f"sampler.resolution={s.resolution}",
        f"train.samples_per_epoch={s.short_samples}",
        f"train.sample_batch_size={s.sample_batch_size}",
        f"train.train_batch_size={s.train_batch_size}",
        f"train.samples_per_step={s.per_gpu_samples_per_step}",
        f"train.transitions_per_forward={variant.transitions_per_forward}",
        f"memory.gradient_checkpointing={str(variant.gradient_checkpointing).lower()}",
        f"train.epochs={warmup + 1}",
        "train.checkpoint_every=0",
        *(["model.dtype=bfloat16", "mixed_precision=bf16"] if cuda else CPU_SCALE_OVERRIDES),
    ]

"""Held-out evaluation and inference-time budgets.

`evaluate_policy`: fixed prompts x fixed seeds, scored by the task's reward (the trainer calls it
outside training time). `budgeted_sample` / `budget_curve`: the paper's Fig. 6 protocol.
`python -m rlcm_exp.evaluate checkpoint=RUN_DIR`: all of it for one checkpoint, printed and written
to eval.json (conf/evaluate.yaml lists the options).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies.ddim import DDIMPolicy, ddim_mean
from rlcm_exp.policies.lcm import LCMPolicy

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
Generators = torch.Generator | list[torch.Generator] | None


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reward_fn: Any,
    prompts: list[str],
    seeds: list[int],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Mean reward over every (prompt, seed) pair; image i uses its own generator, so results do not
    depend on batch size or on the training run's random state. A reward that returns a dict also
    gets the mean of each of its other entries (e.g. the toy detector's "shape") in `eval_components`."""
    jobs = [(p, s) for p in prompts for s in seeds]
    parts: dict[str, list[torch.Tensor]] = {}
    images: list[torch.Tensor] = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = [torch.Generator(device).manual_seed(s) for _, s in chunk]
        traj = policy.sample([p for p, _ in chunk], gens)
        out = reward_fn(traj.images, [p for p, _ in chunk])
        for key, value in (out if isinstance(out, dict) else {"reward": out}).items():
            parts.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float32).cpu().reshape(-1))
        kept = sum(int(i.shape[0]) for i in images)
        images.append(traj.images[: max(0, 16 - kept)].cpu())
    r = torch.cat(parts.pop("reward")).numpy().astype(np.float64)
    per_prompt = {p: float(r[i * len(seeds) : (i + 1) * len(seeds)].mean()) for i, p in enumerate(prompts)}
    return {
        "eval_reward_mean": float(np.nanmean(r)),
        "eval_reward_std": float(np.nanstd(r)),
        "eval_components": {k: float(torch.cat(v).nanmean()) for k, v in parts.items()},
        "eval_per_prompt": per_prompt,
        "eval_images": torch.cat(images),
        "eval_captions": [f"{p} (seed {s})" for p, s in jobs[:16]],
    }


# ----------------------------------------------------------------------------- inference-time budget
#
# The paper's Fig. 6 protocol: give each image a time budget, stop the sampler when it is spent and
# decode the current estimate. The policies' own `sample` always runs all H steps, so the loops below
# re-drive their public pieces (`encode_prompts`, `_mean` / `_eps`, `decode`) step by step, drawing
# the same random numbers in the same order: without a budget they give `sample`'s images exactly.


def _sync(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work issued before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lcm_estimates(policy: LCMPolicy, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
    """After each UNet call, the LCM's current estimate of the clean latent: that call's `denoised`."""
    embeds = policy.encode_prompts(prompts)
    batch, device = len(prompts), policy.device
    side = policy.resolution // policy.vae_scale
    shape = (batch, policy.latent_channels, side, side)
    x = (
        randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype).float()
        * policy.init_noise_sigma
    )
    w_emb = policy._w_embedding(batch, embeds.dtype)
    for k in range(policy.num_steps):
        step = torch.full((batch,), k, dtype=torch.long, device=device)
        mean, denoised, std = policy._mean(x, step, embeds, w_emb)
        yield denoised
        if k < policy.num_steps - 1:  # the draw `sample` makes before the next call
            z = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype).float()
            x = mean + std * z


def _ddim_estimates(policy: DDIMPolicy, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
    """After each DDIM step, the predicted x0 of that step; after the last step, the final sample itself
    (what `sample` decodes)."""
    embeds = policy.encode_prompts(prompts)
    batch, device = len(prompts), policy.device
    side = policy.resolution // policy.vae_scale
    shape = (batch, policy.latent_channels, side, side)
    x = (
        randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype) * policy.init_noise_sigma
    ).float()
    table, timesteps = policy._tables(device)
    for k in range(policy.num_steps):
        step = torch.full((batch,), k, dtype=torch.long, device=device)
        sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction, sigma = table[:, step].view(5, -1, 1, 1, 1)
        eps = policy._eps(x, timesteps[step], embeds, policy.use_cfg)
        x0_hat = (x - sqrt_1m_abar * eps) / sqrt_abar
        mean = ddim_mean(eps, x, sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction)
        z = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)  # sample's draw order
        x = mean + sigma * z.float()
        yield x if k == policy.num_steps - 1 else x0_hat


@dataclass
class BudgetedRollout:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]: the decoded estimate when the budget ran out
    steps_taken: int  # UNet calls (sampler steps) made before stopping
    seconds_per_image: float  # wall-clock of the batch (prompt encoding, steps, decoding) / batch size


@torch.no_grad()
def budgeted_sample(
    policy: LCMPolicy | DDIMPolicy,
    prompts: list[str],
    generator: Generators,
    max_seconds: float | None = None,
    max_steps: int | None = None,
) -> BudgetedRollout:
    """Roll out until `max_seconds` per image (x batch size) or `max_steps` is spent, then decode.

    A step is not started when the time so far plus the mean step time would exceed the budget, so
    the budget is kept rather than overshot by one step; the first step always runs (there is no
    estimate before it). Decoding the estimate happens after the budget and is included in
    `seconds_per_image`. No budget and no step cap gives exactly `policy.sample`'s images.
    """
    if isinstance(policy, LCMPolicy):
        estimates = _lcm_estimates(policy, prompts, generator)
    elif isinstance(policy, DDIMPolicy):
        estimates = _ddim_estimates(policy, prompts, generator)
    else:
        raise TypeError(f"budgeted_sample drives LCMPolicy or DDIMPolicy, not {type(policy).__name__}")
    device = policy.device
    budget = None if max_seconds is None else max_seconds * len(prompts)
    _sync(device)
    start = time.perf_counter()
    first_step_at: float | None = None
    estimate: torch.Tensor | None = None
    steps = 0
    for estimate in estimates:  # noqa: B007 (the last estimate is used after the loop)
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
        if budget is not None:
            _sync(device)
            now = time.perf_counter() - start
            if first_step_at is None:  # prompt encoding + first step: not a per-step cost
                first_step_at = now
                per_step = now
            else:
                per_step = (now - first_step_at) / (steps - 1)
            if now + per_step > budget:
                break
    assert estimate is not None
    images = policy.decode(estimate)
    _sync(device)
    return BudgetedRollout(images, steps, (time.perf_counter() - start) / len(prompts))


@torch.no_grad()
def seconds_per_image(
    policy: Any, prompts: list[str], batch_size: int, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Wall-clock seconds per image of a full rollout (`policy.sample`, decoding included) on the policy's
    device, averaged over `repeats` batches after `warmup` untimed ones (allocator, cuDNN autotuning)."""
    device = policy.device
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    for i in range(warmup):
        policy.sample(batch, torch.Generator(device).manual_seed(seed + i))
    _sync(device)
    start = time.perf_counter()
    for i in range(repeats):
        policy.sample(batch, torch.Generator(device).manual_seed(seed + warmup + i))
    _sync(device)
    return (time.perf_counter() - start) / (repeats * batch_size)


@torch.no_grad()
def budget_curve(
    policy: LCMPolicy | DDIMPolicy,
    reward_fn: Any,
    prompts: list[str],
    seeds: list[int],
    budgets: list[float],
    batch_size: int,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """For each budget (seconds per image): mean/std reward of prompts x seeds under that budget, the
    mean number of steps taken and the seconds per image actually used. Same seeds for every budget."""
    jobs = [(p, s) for p in prompts for s in seeds]
    rows = []
    for budget in budgets:
        rewards, steps, seconds = [], [], []
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            gens = [torch.Generator(device).manual_seed(s) for _, s in chunk]
            out = budgeted_sample(policy, [p for p, _ in chunk], gens, max_seconds=budget)
            r = reward_fn(out.images, [p for p, _ in chunk])
            r = r["reward"] if isinstance(r, dict) else r
            rewards.append(torch.as_tensor(r, dtype=torch.float32).cpu().reshape(-1))
            steps += [out.steps_taken] * len(chunk)
            seconds += [out.seconds_per_image] * len(chunk)
        arr = torch.cat(rewards).numpy().astype(np.float64)
        rows.append(
            {
                "budget_s": float(budget),
                "reward_mean": float(np.nanmean(arr)),
                "reward_std": float(np.nanstd(arr)),
                "steps_mean": float(np.mean(steps)),
                "seconds_per_image": float(np.mean(seconds)),
                "n": len(jobs),
            }
        )
    return rows


def auto_budgets(full_rollout_s: float, num_steps: int, points: int) -> list[float]:
    """`points` budgets from about one step's share of a full rollout up to the full rollout, geometric."""
    low = full_rollout_s / num_steps
    return [float(b) for b in np.geomspace(low, full_rollout_s, points)] if points > 1 else [full_rollout_s]


# ----------------------------------------------------------------------------- the CLI
#
# python -m rlcm_exp.evaluate checkpoint=RUN_DIR [steps=[2,4,8]] [budgets=[0.5,1,2] | budget_points=6]

# taken from the run's config.yaml unless overridden on the command line (algo only labels the results)
RUN_GROUPS = ("model", "sampler", "task", "reward", "algo")


def find_run_dir(checkpoint: str | Path) -> Path | None:
    """The run dir behind `checkpoint`: itself, or RUN of RUN/checkpoints/NAME; None for a bare LoRA folder."""
    p = Path(checkpoint).expanduser()
    for candidate in (p, p.parent.parent):
        if (candidate / "config.yaml").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    return None


def merge_run_config(cfg: DictConfig, run_cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """cfg with model/sampler/task/reward taken from the run's resolved config, except where the command
    line overrode them: a group choice (`task=X`) keeps the composed group (a task choice also keeps the
    reward it selects), a key (`sampler.num_steps=2`) is applied on top of the run's group."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    chosen = {k for k in keys if "." not in k}
    if "task" in chosen:
        chosen.add("reward")
    merged = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(merged, DictConfig)
    for group in RUN_GROUPS:
        if group in chosen or group not in run_cfg:
            continue
        merged[group] = run_cfg[group]
        for key in keys:
            if key.startswith(group + "."):
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    return merged


class _LoadOnce:
    """A model family whose members are loaded once: policies for several step counts share one UNet
    (and so one loaded LoRA)."""

    def __init__(self, family: Any) -> None:
        self.family = family
        self.pipes: dict[str, Any] = {}

    def member(self, kind: str) -> Any:
        return self.family.member(kind)

    def load(self, kind: str, device: torch.device | str = "cpu") -> Any:
        if kind not in self.pipes:
            self.pipes[kind] = self.family.load(kind, device)
        return self.pipes[kind]


def software_versions() -> dict[str, str]:
    """Versions of what produced the numbers (written next to them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "peft",
        "hydra-core",
        "wandb",
        "rlcm-exp",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_evaluation(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Held-out reward, seconds per image of full rollouts at each step count, and reward under each
    time budget, for one checkpoint (or the base model); printed and written to OUT/eval.json."""
    from hydra.utils import instantiate

    from rlcm_exp.__main__ import build_reward
    from rlcm_exp.checkpoint import resolve_lora_folder

    run_dir = find_run_dir(cfg.checkpoint) if cfg.checkpoint else None
    if run_dir is not None:
        run_cfg = OmegaConf.load(run_dir / "config.yaml")
        if not isinstance(run_cfg, DictConfig):
            raise ConfigError(f"{run_dir / 'config.yaml'} is not a run config (a mapping)")
        cfg = merge_run_config(cfg, run_cfg, list(overrides or []))
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
    family = _LoadOnce(instantiate(cfg.model))
    lora = resolve_lora_folder(cfg.checkpoint) if cfg.checkpoint else None

    def build(num_steps: int) -> Any:
        return instantiate(cfg.sampler, num_steps=num_steps, _partial_=True)(family=family, device=device)

    own_steps = int(cfg.sampler.num_steps)
    policy = build(own_steps)
    if lora is not None:
        policy.unet.load_lora_adapter(
            str(lora), prefix="unet", weight_name="pytorch_lora_weights.safetensors"
        )
    reward_fn = build_reward(cfg.reward, device)
    if cfg.prompts not in ("heldout", "train"):
        raise ConfigError(f"prompts={cfg.prompts}: use heldout (task.eval_prompts) or train (task.prompts)")
    prompts = list(
        instantiate(cfg.task.eval_prompts) if cfg.prompts == "heldout" else instantiate(cfg.task.prompts)
    )
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]

    held = evaluate_policy(policy, reward_fn, prompts, seeds, cfg.batch_size, device)
    step_rows = []
    for num_steps in list(cfg.steps or [own_steps]):
        p = policy if num_steps == own_steps else build(num_steps)
        res = held if p is policy else evaluate_policy(p, reward_fn, prompts, seeds, cfg.batch_size, device)
        step_rows.append(
            {
                "num_steps": int(num_steps),
                "seconds_per_image": seconds_per_image(p, prompts, cfg.batch_size, cfg.timing_repeats),
                "reward_mean": res["eval_reward_mean"],
                "reward_std": res["eval_reward_std"],
                "n": len(prompts) * len(seeds),
            }
        )
    budgets = [float(b) for b in cfg.budgets or []]
    if not budgets and cfg.budget_points > 0:
        # budgets relative to this sampler's own full rollout, from about one step's share up to all of it
        timed = [r["seconds_per_image"] for r in step_rows if r["num_steps"] == own_steps]
        full = timed[0] if timed else seconds_per_image(policy, prompts, cfg.batch_size, cfg.timing_repeats)
        budgets = auto_budgets(full, own_steps, cfg.budget_points)
    budget_rows = (
        budget_curve(policy, reward_fn, prompts, seeds, budgets, cfg.batch_size, device) if budgets else []
    )

    result = {
        "checkpoint": str(lora) if lora else None,
        "run_dir": str(run_dir) if run_dir else None,
        "algo": str(OmegaConf.select(cfg, "algo.name", default=None) or type(policy).__name__),
        "task": str(cfg.task.name),
        "sampler": type(policy).__name__,
        "num_steps": own_steps,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "heldout": {
            "eval_reward_mean": held["eval_reward_mean"],
            "eval_reward_std": held["eval_reward_std"],
            "eval_per_prompt": held["eval_per_prompt"],
            "components": held["eval_components"],
            "n": len(prompts) * len(seeds),
        },
        "steps": step_rows,
        "budgets": budget_rows,
        "versions": software_versions(),
    }
    out = Path(cfg.out) if cfg.out else (run_dir / "eval" if run_dir else Path("eval"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(describe(result))
    print(f"wrote {out / 'eval.json'}")
    return result


def describe(result: dict[str, Any]) -> str:
    """The numbers of `run_evaluation` as a few plain-text tables."""
    h = result["heldout"]
    lines = [
        f"checkpoint {result['checkpoint'] or '(base model)'}  task {result['task']}  {result['sampler']} "
        f"H={result['num_steps']}  device {result['device']}",
        f"held-out reward {h['eval_reward_mean']:.4f} +- {h['eval_reward_std']:.4f} over {h['n']} images"
        + "".join(f", {k} {v:.4f}" for k, v in h["components"].items()),
        "steps  s/image   reward mean +- std",
    ]
    lines += [
        f"{r['num_steps']:5d}  {r['seconds_per_image']:.4f}  {r['reward_mean']:.4f} +- {r['reward_std']:.4f}"
        for r in result["steps"]
    ]
    if result["budgets"]:
        lines.append("budget s/image  used s/image  steps  reward mean +- std")
        lines += [
            f"{r['budget_s']:14.4f}  {r['seconds_per_image']:12.4f}  {r['steps_mean']:5.2f}  "
            f"{r['reward_mean']:.4f} +- {r['reward_std']:.4f}"
            for r in result["budgets"]
        ]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from rlcm_exp.__main__ import find_config_error

    try:
        run_evaluation(cfg, list(HydraConfig.get().overrides.task))
    except Exception as err:
        config_error = find_config_error(err)
        if config_error is None:
            raise
        print(f"error: {config_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

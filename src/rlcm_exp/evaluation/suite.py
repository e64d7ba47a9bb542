"""The evaluation of one checkpoint (or the base model), as `python -m rlcm_exp.evaluate` runs it:
held-out reward, seconds per image of full rollouts at each step count, and reward under each
inference-time budget (Fig. 6); printed and written to OUT/eval.json (OUT/eval_<set>.json for a
named prompt set), with the standard reward table OUT/rewards_<set>.{json,md,csv} (tables.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rlcm_exp.configs import probe_folder
from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.budget import (
    auto_budgets,
    budget_curve,
    budget_jobs,
    seconds_per_image,
)
from rlcm_exp.evaluation.heldout import evaluate_policy
from rlcm_exp.evaluation.runs import SharedFamily, config_for_checkpoint, load_lora, pick_device
from rlcm_exp.evaluation.tables import reward_rows, write_reward_table
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.build import build_policy
from rlcm_exp.prompts import PROMPT_SETS, read_prompt_file, unknown_set_hint
from rlcm_exp.provenance import software_versions
from rlcm_exp.rewards.base import RewardFn, build_reward


@dataclass
class Subject:
    """What is evaluated: the policy at its own step count (LoRA loaded), a builder for other step
    counts sharing its UNet, the reward, and the (prompt, seed) jobs."""

    policy: Policy
    build: Callable[[int], Policy]
    reward_fn: RewardFn
    prompts: list[str]
    seeds: list[int]
    device: torch.device
    lora: Path | None
    prompt_label: str  # heldout | train | the prompt set's name | the prompt file's stem

    @property
    def n(self) -> int:
        return len(self.prompts) * len(self.seeds)


def load_subject(cfg: DictConfig) -> Subject:
    """Build the policy, load the checkpoint's LoRA into it, build the reward and the prompts."""
    label, prompts = evaluation_prompts(cfg)
    device = pick_device(cfg.device)
    family = SharedFamily(instantiate(cfg.model))

    def build(num_steps: int) -> Policy:
        return build_policy(cfg, device, family, num_steps=num_steps)

    policy = build(int(cfg.sampler.num_steps))
    lora = load_lora(policy, cfg.checkpoint, cfg.get("ema", False)) if cfg.checkpoint else None
    seeds = [cfg.seed + i for i in range(cfg.eval_seeds)]
    return Subject(policy, build, build_reward(cfg.reward, device), prompts, seeds, device, lora, label)


def evaluation_prompts(cfg: DictConfig) -> tuple[str, list[str]]:
    """(label, prompts) of `prompts=`: heldout (task.eval_prompts), train (task.prompts), a named set
    (rlcm_exp.prompts.PROMPT_SETS, the shipped files of assets/prompts/ among them) or a text file."""
    choice = str(cfg.prompts)
    if choice in ("heldout", "train"):
        node = cfg.task.eval_prompts if choice == "heldout" else cfg.task.prompts
        return choice, list(instantiate(node))
    if choice in PROMPT_SETS:
        return choice, PROMPT_SETS[choice]()
    path = Path(choice).expanduser()
    if path.suffix or path.is_file():
        return path.stem, read_prompt_file(path, "prompts=")
    raise ConfigError(
        f"prompts={choice}: use heldout (task.eval_prompts), train (task.prompts), a prompt set "
        f"({', '.join(sorted(PROMPT_SETS))}) or a text file, one prompt per line." + unknown_set_hint(choice)
    )


def step_rows(cfg: DictConfig, s: Subject, held: dict[str, Any]) -> list[dict[str, Any]]:
    """Full rollouts at each step count of `cfg.steps` (default: the sampler's own): time and reward."""
    own_steps = s.policy.num_steps
    rows = []
    for num_steps in list(cfg.steps or [own_steps]):
        p = s.policy if num_steps == own_steps else s.build(num_steps)
        res = (
            held
            if p is s.policy
            else evaluate_policy(p, s.reward_fn, s.prompts, s.seeds, cfg.batch_size, s.device)
        )
        rows.append(
            {
                "num_steps": int(num_steps),
                "seconds_per_image": seconds_per_image(p, s.prompts, cfg.batch_size, cfg.timing_repeats),
                "reward_mean": res["eval_reward_mean"],
                "reward_std": res["eval_reward_std"],
                "n": s.n,
            }
        )
    return rows


def budget_rows(cfg: DictConfig, s: Subject, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The time-budget curve at `cfg.budgets`, or at `cfg.budget_points` budgets relative to this
    sampler's own full rollout (from about one step's share up to all of it); none if neither is set."""
    budgets = [float(b) for b in cfg.budgets or []]
    own_steps = s.policy.num_steps
    if not budgets and cfg.budget_points > 0:
        timed = [r["seconds_per_image"] for r in steps if r["num_steps"] == own_steps]
        full = (
            timed[0] if timed else seconds_per_image(s.policy, s.prompts, cfg.batch_size, cfg.timing_repeats)
        )
        budgets = auto_budgets(full, own_steps, cfg.budget_points)
    if not budgets:
        return []
    # the same (prompt, seed) pairs at every budget: budget_trajectories of them (the paper: 100)
    jobs = budget_jobs(s.prompts, cfg.seed, int(cfg.budget_trajectories))
    return budget_curve(s.policy, s.reward_fn, jobs, budgets, cfg.batch_size, s.device)


def run_evaluation(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Held-out reward, seconds per image of full rollouts at each step count, and reward under each
    time budget, for one checkpoint (or the base model); printed and written to OUT/eval.json.

    Given a run dir (or a checkpoint folder inside one), model/sampler/task/reward/algo come from its
    config.yaml, except what `overrides` (the command line) sets."""
    cfg, run_dir = config_for_checkpoint(cfg, list(overrides or []))
    out = Path(cfg.out) if cfg.out else (run_dir / "eval" if run_dir else Path("eval"))
    probe_folder(out, f"out={cfg.out}" if cfg.out else f"out (default {out})")  # before minutes of work
    s = load_subject(cfg)
    held = evaluate_policy(s.policy, s.reward_fn, s.prompts, s.seeds, cfg.batch_size, s.device)
    steps = step_rows(cfg, s, held)
    sampler = type(s.policy).__name__
    result = {
        "checkpoint": str(s.lora) if s.lora else None,
        "run_dir": str(run_dir) if run_dir else None,
        "algo": str(OmegaConf.select(cfg, "algo.name", default=None) or sampler),
        "task": str(cfg.task.name),
        "sampler": sampler,
        "num_steps": s.policy.num_steps,
        "device": str(s.device) if s.device.type == "cpu" else torch.cuda.get_device_name(s.device),
        "heldout": {
            "eval_reward_mean": held["eval_reward_mean"],
            "eval_reward_std": held["eval_reward_std"],
            "eval_per_prompt": held["eval_per_prompt"],
            "components": held["eval_components"],
            "n": s.n,
        },
        "steps": steps,
        "budgets": budget_rows(cfg, s, steps),
        "versions": software_versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    # heldout/train keep eval.json; another prompt set gets its own, next to its reward table
    name = "eval.json" if s.prompt_label in ("heldout", "train") else f"eval_{s.prompt_label}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    table = write_reward_table(out, reward_table(cfg, s, result, held))
    print(describe(result))
    print(f"wrote {out / name}, {', '.join(str(p) for p in table)}")
    return result


def reward_table(cfg: DictConfig, s: Subject, result: dict[str, Any], held: dict[str, Any]) -> dict[str, Any]:
    """The standard table of this evaluation: every reward output at the fixed seeds (evaluation/tables.py)."""
    return {
        "prompts": s.prompt_label,
        "n_prompts": len(s.prompts),
        "seeds": s.seeds,
        "checkpoint": result["checkpoint"],
        "run_dir": result["run_dir"],
        "ema": bool(cfg.get("ema", False)),
        "algo": result["algo"],
        "task": result["task"],
        "num_steps": result["num_steps"],
        "rows": reward_rows(held["eval_values"]),
    }


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

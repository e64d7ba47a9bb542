"""Typed ranges for every numeric, boolean and choice key of the shipped configs, checked on the
composed config before anything is written or loaded.

One table, not checks scattered case by case: a key the table does not know is caught by the test
that composes every config (tests/test_validation.py), so a new key cannot ship without its range.
Keys under `reward.` that the table does not name are a user reward's own options and pass through.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rlcm_exp.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    kind: str  # "int" | "float" | "bool" | "choice" | "name" (a non-empty string)
    low: float | None = None  # inclusive lower bound (exclusive when low_open)
    high: float | None = None  # inclusive upper bound (exclusive when high_open)
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False  # null is a valid value (e.g. "the member's native resolution")
    choices: tuple[str, ...] = ()  # a choice's values; for a number, words it also takes ("auto")
    what: str = ""  # meaning, for the message

    def describe(self) -> str:
        if self.kind == "choice":
            return f"one of {list(self.choices)}" + (" or null" if self.nullable else "")
        if self.kind == "bool":
            return "true or false"
        if self.kind == "name":
            return "a non-empty name"
        lo = "" if self.low is None else (f"> {self.low}" if self.low_open else f">= {self.low}")
        hi = "" if self.high is None else (f"< {self.high}" if self.high_open else f"<= {self.high}")
        bounds = " and ".join(b for b in (lo, hi) if b)
        kind = "an integer" if self.kind == "int" else "a number"
        words = "".join(f" or {w!r}" for w in self.choices)
        return f"{kind}" + (f" {bounds}" if bounds else "") + words + (" (or null)" if self.nullable else "")


def _int(low: float | None = None, high: float | None = None, what: str = "", nullable: bool = False) -> Rule:
    return Rule("int", low, high, nullable=nullable, what=what)


def _pos(what: str = "") -> Rule:
    return Rule("float", 0.0, None, low_open=True, what=what)


def _nonneg(what: str = "") -> Rule:
    return Rule("float", 0.0, None, what=what)


BOOL = Rule("bool")
SEED_MAX = 2**32 - 1  # numpy's legacy seeding (accelerate's set_seed) takes 32-bit seeds


@dataclass(frozen=True)
class ListRule:
    """A list-valued key: every item follows `item`; exactly `length` items, or at least `min_length`."""

    item: Rule
    length: int | None = None
    min_length: int = 1
    what: str = ""
    example: str = ""

    def describe(self) -> str:
        count = f"{self.length}" if self.length is not None else f"{self.min_length} or more"
        return f"a list of {count} items, each {self.item.describe()}" + (
            f", e.g. {self.example}" if self.example else ""
        )

    def valid(self, value: Any) -> bool:
        if not isinstance(value, list) or len(value) < self.min_length:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        return all(_valid(self.item, v) for v in value)


LIST_RULES: dict[str, ListRule] = {
    "optimizer.betas": ListRule(
        Rule("float", 0.0, 1.0, high_open=True), length=2, what="Adam's beta1, beta2", example="[0.9,0.999]"
    ),
    "model.memory.guidance_embedding": ListRule(
        Rule("choice", choices=("diffusion", "lcm")),
        min_length=0,
        what="members whose guidance is an embedding",
        example="[lcm]",
    ),
    "algo.lora.target_modules": ListRule(
        Rule("name"), what="UNet layers that get a LoRA", example="[to_q,to_k,to_v,to_out.0]"
    ),
}
MAX_SAMPLES_PER_EPOCH = 2**20  # GLOBAL trajectories per round (the paper's rounds: 32 to 320)
MAX_EVAL_SEEDS = 1024  # held-out seeds per prompt

RULES: dict[str, Rule] = {
    "seed": _int(0, SEED_MAX, "global seed"),
    "device": Rule("choice", choices=("auto", "cpu", "job", "cuda"), what="where the run goes"),
    "mixed_precision": Rule("choice", choices=("auto", "no", "fp16", "bf16")),
    "tf32": BOOL,
    "train.epochs": _int(1, None, "sampling rounds"),
    # sizes bounded before anything is allocated: a round's trajectories (images, latents, log-probs)
    # and the held-out images live in memory at once; 2^20 trajectories of 64x64 images alone are 48 GiB
    "train.samples_per_epoch": _int(1, MAX_SAMPLES_PER_EPOCH, "GLOBAL trajectories per round"),
    "train.sample_batch_size": _int(1, None, "PER PROCESS trajectories per sampling forward"),
    "train.train_batch_size": _int(1, None, "PER PROCESS trajectories per minibatch"),
    "train.samples_per_step": _int(1, None, "GLOBAL trajectories per optimizer step"),
    "train.inner_epochs": _int(1, None),
    "train.transitions_per_forward": Rule(
        "int", 0, choices=("auto",), what="PER PROCESS trained transitions per UNet call; 0: all"
    ),
    "train.max_grad_norm": _pos("gradient-norm clip"),
    "train.save_images": _int(0),
    "train.save_images_every": _int(0),
    "train.reward_workers": _int(0, 64),
    "train.reward_timeout_s": Rule(
        "float", 0.0, 7 * 86400, low_open=True, nullable=True, what="s per reward call"
    ),
    "train.max_nonfinite_in_a_row": _int(1),
    "train.reward_server_gpus": _int(0),
    "train.checkpoint_every": _int(0),
    "train.keep_last": _int(0),
    "train.dump_rollouts": BOOL,
    "train.eval_every": _int(0),
    "train.eval_seeds": _int(1, MAX_EVAL_SEEDS, "seeds per held-out prompt"),
    "train.max_wallclock_s": Rule(
        "float", 0.0, None, low_open=True, nullable=True, what="training budget in s"
    ),
    "train.ema_decay": Rule("float", 0.0, 0.999999, low_open=True, nullable=True, what="EMA decay per step"),
    "train.eval_ema": BOOL,
    "memory.*": BOOL,
    "algo.timestep_fraction": Rule("float", 0.0, 1.0, low_open=True),
    "algo.timestep_window": Rule("float", 0.0, 1.0, low_open=True),
    "algo.lr_schedule.start_factor": Rule("float", 0.0, None, low_open=True),
    "algo.lr_schedule.end_factor": _nonneg(),
    "algo.ppo.clip_range": Rule("float", 0.0, 1.0, low_open=True, what="PPO clip range eps"),
    "algo.ppo.adv_clip_max": _pos("advantage clip"),
    "algo.lora.rank": _int(1, 4096, "LoRA rank"),
    "algo.lora.alpha": Rule("float", 0.0, None, low_open=True, what="LoRA alpha"),
    "algo.stat_tracker.buffer_size": _int(1),
    "algo.stat_tracker.min_count": _int(1),
    "algo.group_size": _int(1, None, "images per prompt per round"),
    "algo.kl_coef": _nonneg("weight of the KL to the base model"),
    "algo.advantage.scale_by_std": BOOL,
    "algo.advantage.eps": _pos("added to the group std"),
    "algo.loss.eta": _pos("REBEL's log-ratio scale"),
    "optimizer.lr": _pos("learning rate"),
    "optimizer.eps": _pos(),
    "optimizer.weight_decay": _nonneg(),
    "model.dtype": Rule("choice", choices=("auto", "float32", "float16", "bfloat16")),
    "model.*.resolution": _int(8, 8192, "native side in px; null: from the weights", nullable=True),
    "model.seed": _int(0, SEED_MAX),
    "model.memory.frozen_params_b": _pos("billions of frozen parameters a training process loads"),
    "model.memory.reference_resolution": _int(8, 8192, "px at which the activation figures hold"),
    "model.memory.activation_gib": Rule(
        "float", 0.0, None, low_open=True, nullable=True, what="GiB per image"
    ),
    "model.memory.checkpointed_activation_gib": Rule(
        "float", 0.0, None, low_open=True, nullable=True, what="GiB per image, checkpointed"
    ),
    "model.process": Rule("choice", choices=("vp", "rectified_flow"), what="what the family's members are"),
    "sampler.num_steps": _int(1, 1000, "sampler steps"),
    "sampler.guidance_scale": _nonneg("guidance scale"),
    "sampler.eta": _nonneg("DDIM eta / CPS eta"),
    "sampler.noise_level": _nonneg("Flow-SDE noise level"),
    "sampler.resolution": _int(8, 8192, "image side in px", nullable=True),
    "sampler.noisy_final_step": BOOL,
    "sampler.train_cfg": BOOL,
    "sampler.timestep_schedule": Rule("choice", choices=("skip", "linspace")),
    "reward.batch_size": _int(1),
    "reward.jpeg_quality": _int(1, 100),
    "reward.max_new_tokens": _int(1, 4096),
    "reward.bertscore_num_layers": _int(1),
    "reward.max_retries": _int(0),
    "reward.max_images_per_request": _int(1),
    "reward.timeout_s": _pos(),
    "reward.backoff_s": _nonneg(),
    "reward.max_backoff_s": _nonneg(),
    "reward.wait_for_server_s": _nonneg(),
    "reward.download_timeout_s": _pos(),
    "reward.scale": Rule("float"),
    "reward.weights.*": Rule("float"),
}
INTERNAL = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def rule_for(key: str) -> Rule | None:
    if key in RULES:
        return RULES[key]
    matches = [pattern for pattern in RULES if "*" in pattern and fnmatch.fnmatchcase(key, pattern)]
    return RULES[max(matches, key=len)] if matches else None


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every scalar of a resolved container; lists are left to their users."""
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            if str(k) not in INTERNAL:
                out += leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if isinstance(node, list) else [(prefix, node)]


def _valid(rule: Rule, value: Any) -> bool:
    if value is None:
        return rule.nullable
    if rule.kind == "bool":
        return isinstance(value, bool)
    if rule.kind == "choice":
        return isinstance(value, str) and (value in rule.choices or value.split(":")[0] in rule.choices)
    if rule.kind == "name":
        return isinstance(value, str) and bool(value.strip())
    if isinstance(value, str):
        return value in rule.choices  # a number's words ("auto")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if rule.kind == "int" and not isinstance(value, int):
        return False
    if not math.isfinite(value):
        return False
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return False
    return rule.high is None or (value < rule.high if rule.high_open else value <= rule.high)


def check_config(cfg: DictConfig) -> None:
    """Refuse the first key whose value is of the wrong type or out of range, naming it."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # an interpolation that does not resolve: say which
        raise ConfigError(f"the config does not resolve: {err}") from err
    for key, value in leaves(resolved):
        rule = rule_for(key)
        if rule is not None and not _valid(rule, value):
            what = f" ({rule.what})" if rule.what else ""
            raise ConfigError(f"{key}={value!r}{what} is not valid: expected {rule.describe()}.")
    for key, list_rule in LIST_RULES.items():
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and not list_rule.valid(node):
            raise ConfigError(
                f"{key}={node!r} ({list_rule.what}) is not valid: expected {list_rule.describe()}."
            )


_ABSENT = object()


def check_device(cfg: DictConfig) -> None:
    """`device=cuda[:N]` needs that CUDA GPU to be visible: never a silent CPU run. (fp16 on a CPU is
    refused where the precision is resolved, models/precision.py, launcher settings included.)"""
    device = str(cfg.get("device", "auto"))
    if not device.startswith("cuda"):
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if device.count(":") == 1 and device.split(":")[1].isdigit() else 0
    if index >= gpus:
        raise ConfigError(
            f"device={device}: {'no CUDA GPU is' if gpus == 0 else f'only {gpus} CUDA GPU(s) are'} visible "
            "to this process; use device=cpu, device=auto (a GPU when there is one), or check "
            "CUDA_VISIBLE_DEVICES and the driver (nvidia-smi)."
        )


def locate(path: str) -> Any:
    """The object a `_target_` names ("pkg.module.attr[.attr]"), importing its longest module prefix;
    raises ImportError or AttributeError. Hydra's instantiate resolves a target the same way."""
    import importlib

    parts = path.split(".")
    if not path or not all(parts):
        raise ImportError(f"{path!r} is not a dotted name")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # this prefix is not a module: try a shorter one (the rest are attributes); a module that
            # exists but fails on its own imports is reported as it is
            missing = err.name or ""
            if cut == 1 or not (module_name == missing or module_name.startswith(missing + ".")):
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(path)  # unreachable: the loop returns or raises


def targets(node: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key of the node, its `_target_`) for every node of a resolved container that has one."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            found.append((prefix, node["_target_"]))
        for k, v in node.items():
            found += targets(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += targets(v, f"{prefix}[{i}]")
    return found


def check_targets(cfg: DictConfig, skip: tuple[str, ...] = ("hydra",)) -> None:
    """Every `_target_` of the config importable, before any model loads: a typo in a custom reward's
    `_target_` is one line naming the key, not a traceback after minutes of loading. Only imports:
    nothing is built."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key, target in targets(resolved):
        if key.split(".")[0] in skip:
            continue
        try:
            found = locate(target)
        except (ImportError, AttributeError) as err:
            raise ConfigError(
                f"{key + '.' if key else ''}_target_={target}: cannot be imported "
                f"({type(err).__name__}: {err}); check the dotted path and that its module is on PYTHONPATH"
            ) from err
        if not callable(found):
            raise ConfigError(f"{key + '.' if key else ''}_target_={target} is not callable")


def check_prompt_sources(cfg: DictConfig) -> None:
    """The user's prompt files exist and their lists are lists of strings (task.prompts and
    task.eval_prompts), checked with the exact key before any model loads."""
    for key in ("task.prompts", "task.eval_prompts"):
        node = OmegaConf.select(cfg, key)
        if not isinstance(node, DictConfig):
            continue
        listed, file = node.get("prompts"), node.get("file")
        if listed is not None:
            items = OmegaConf.to_container(listed) if OmegaConf.is_config(listed) else listed
            if (
                not isinstance(items, list)
                or not items
                or not all(isinstance(p, str) and p.strip() for p in items)
            ):
                raise ConfigError(
                    f"{key}.prompts={items!r}: give a non-empty list of prompts, e.g. {key}.prompts='[a cat,a red fox]'"
                )
        elif file is not None:
            from pathlib import Path

            from rlcm_exp.prompts import read_prompt_file

            if not Path(str(file)).expanduser().is_file():
                raise ConfigError(f"{key}.file={file}: no such file (a text file, one prompt per line)")
            read_prompt_file(Path(str(file)).expanduser(), f"{key}.file")  # UTF-8, not empty


def check_sampler_options(cfg: DictConfig) -> None:
    """Every key of `sampler` is an option of the builder it names: the paper layer
    (conf/paper/ALGO_TASK.yaml) sets its own sampler's options (DDPO's eta), which another sampler
    (sampler=lcm or a flow sampler under algo=ddpo) does not take."""
    import inspect

    node = cfg.get("sampler")
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        return
    builder = locate(node._target_)
    if hasattr(builder, "check_options"):  # a builder of several samplers: which keys this one takes
        builder.check_options(node)
    params = inspect.signature(builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    options = [name for name in params if name not in ("family", "device")]
    for key in (str(k) for k in node):
        if key not in INTERNAL and key not in params:
            name = str(node._target_).rsplit(".", 1)[-1]
            raise ConfigError(
                f"sampler.{key}={node.get(key)!r} is not an option of {name} (its options: {options}); "
                "the paper layer sets its own sampler's options, so with another sampler add ~paper"
            )


def check_sampler_fits_model(cfg: DictConfig) -> None:
    """The sampler against the model family, reading only config files (no weights load): the builder's
    `check_family(family, sampler_node)` where it has one: a flow sampler on a VP family or the
    reverse, a family without the member the sampler drives, guidance the member does not support, a
    resolution its VAE and patching cannot divide, `sampler.stochastic_steps` outside the schedule."""
    from hydra.utils import instantiate

    node, model = cfg.get("sampler"), cfg.get("model")
    if not isinstance(node, DictConfig) or not isinstance(model, DictConfig) or "_target_" not in model:
        return
    check_family = getattr(locate(str(node._target_)), "check_family", None)
    if check_family is not None:
        check_family(instantiate(model), node)


def check_optimizer_available(cfg: DictConfig) -> None:
    """An optimizer builder's own `check_available()` (training/optimizers.py: adam8bit needs
    bitsandbytes), before any model loads."""
    target = cfg.get("optimizer", {}).get("_target_")
    check = getattr(locate(target), "check_available", None) if target else None
    if check is not None:
        check()


def check_before_loading(cfg: DictConfig) -> None:
    """Everything about a training config that needs no model: types and ranges, the device and
    precision, `_target_`s, the sampler's options, the user's prompt files, the sampler against the
    model family's configs."""
    check_config(cfg)
    check_device(cfg)
    check_targets(cfg)
    check_optimizer_available(cfg)
    check_sampler_options(cfg)
    check_prompt_sources(cfg)
    check_sampler_fits_model(cfg)

"""Bad input: a one-line error naming the key, a non-zero exit and no traceback, before any model loads.

The range table (rlcm_exp/validation.py) must know every numeric, boolean and choice key of every
shipped config; the fuzz test drives the real entry point with over 100 bad overrides.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlcm_exp.configs import compose, conf_dir, is_building_block
from rlcm_exp.errors import ConfigError
from rlcm_exp.validation import check_config, leaves, rule_for

GROUPS = ["algo", "model", "sampler", "task", "reward", "optimizer", "logger"]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not is_building_block(p))


def test_every_typed_key_of_every_config_has_a_rule() -> None:
    missing = set()
    for group in GROUPS:
        for option in group_options(group):
            overrides = [f"{group}={option}"] + (["reward._target_=x.y"] if option == "custom" else [])
            cfg = OmegaConf.to_container(compose(overrides=overrides), resolve=False)
            for key, value in leaves(cfg):
                typed = isinstance(value, bool | int | float) and not key.startswith("reward.")
                if typed and rule_for(key) is None:
                    missing.add(key)
    assert not missing, f"keys without a range in rlcm_exp/validation.py: {sorted(missing)}"


def test_the_shipped_configs_pass() -> None:
    for group in ("algo", "task", "model", "sampler"):
        for option in group_options(group):
            check_config(compose(overrides=[f"{group}={option}"]))
    for name in ("quickstart", "toy/rlcm_compression", "paper/ddpo_aesthetic"):
        check_config(compose(overrides=[f"experiment={name}"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=0", "train.epochs"),
        ("algo.ppo.clip_range=-0.1", "algo.ppo.clip_range"),
        ("sampler.guidance_scale=-1", "sampler.guidance_scale"),
        ("train.epochs=1.5", "train.epochs"),
        ("memory.channels_last=maybe", "memory.channels_last"),
        ("algo.lora.rank=0", "algo.lora.rank"),
    ],
)
def test_check_config_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(compose(overrides=["model=tiny", override]))


# (override, a string the message must contain): wrong types, out-of-range values, unknown keys,
# missing files. Each runs through `python -m rlcm_exp model=tiny task=compression ...`.
NUMERIC_BAD = {
    "train.epochs": ["0", "-3", "1.5", "abc", "true", "null"],
    "train.samples_per_epoch": ["0", "-8", "2.5", "x"],
    "train.sample_batch_size": ["0", "-1", "1.5", "y"],
    "train.train_batch_size": ["0", "-2", "0.5", "z"],
    "train.samples_per_step": ["0", "-16", "q"],
    "train.inner_epochs": ["0", "-1", "one"],
    "train.max_grad_norm": ["0", "-1", "inf", "nan", "big"],
    "train.save_images": ["-1", "2.5"],
    "train.reward_workers": ["-1", "1000", "w"],
    "train.max_nonfinite_in_a_row": ["0", "-5"],
    "train.checkpoint_every": ["-1", "e"],
    "train.keep_last": ["-2"],
    "train.eval_every": ["-1", "1.5"],
    "train.eval_seeds": ["0", "-4"],
    "train.dump_rollouts": ["2", "maybe"],
    "algo.timestep_fraction": ["0", "-0.5", "1.5", "half"],
    "algo.timestep_window": ["0", "2", "w"],
    "algo.ppo.clip_range": ["0", "-0.1", "1.5", "wide"],
    "algo.ppo.adv_clip_max": ["0", "-5"],
    "algo.lora.rank": ["0", "-4", "2.5", "r"],
    "algo.lora.alpha": ["0", "-1", "a"],
    "algo.stat_tracker.buffer_size": ["0", "-1"],
    "algo.stat_tracker.min_count": ["0", "m"],
    "algo.lr_schedule.end_factor": ["-0.5", "e"],
    "optimizer.lr": ["0", "-1e-4", "fast", "nan"],
    "optimizer.weight_decay": ["-1"],
    "sampler.num_steps": ["0", "-4", "2.5", "many", "5000"],
    "sampler.guidance_scale": ["-1", "g"],
    "sampler.resolution": ["0", "-32", "3.5"],
    "sampler.timestep_schedule": ["cosine", "1"],
    "memory.gradient_checkpointing": ["yes please", "3"],
    "memory.channels_last": ["maybe"],
    "seed": ["-1", "1.5", "s"],
    "mixed_precision": ["fp8", "8"],
    "device": ["tpu", "1"],
    "model.dtype": ["float8", "int8"],
}
OTHER_BAD = [
    ("train.nosuch=1", "nosuch"),
    ("algo.ppo.nosuch=1", "nosuch"),
    ("sampler.nosuch=1", "nosuch"),
    ("nosuch=1", "nosuch"),
    ("model=nosuch", "nosuch"),
    ("algo=nosuch", "nosuch"),
    ("task=nosuch", "nosuch"),
    ("reward=nosuch", "nosuch"),
    ("sampler=nosuch", "nosuch"),
    ("resume=/nonexistent/checkpoint", "resume"),
    ("task.prompts.file=/nonexistent/prompts.txt", "/nonexistent/prompts.txt"),
    ("reward=custom", "reward._target_"),
    ("reward=custom reward._target_=no_such_module.fn", "reward._target_"),
]


def cases() -> list[tuple[list[str], str]]:
    out = [([f"{key}={value}"], key) for key, values in NUMERIC_BAD.items() for value in values]
    out += [(override.split(), needle) for override, needle in OTHER_BAD]
    return out


DRIVER = """
import contextlib, io, json, sys
import rlcm_exp.__main__ as entry
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    code = 0
    sys.argv = ["rlcm_exp", *argv]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            entry.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # an escaped exception is a failure of the test, reported as such
            import traceback
            traceback.print_exc(file=err)
            code = -1
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


@pytest.mark.subprocess
def test_fuzz_bad_overrides_exit_cleanly_naming_the_key(tmp_path: Path) -> None:
    all_cases = cases()
    assert len(all_cases) >= 100
    argvs = [
        ["model=tiny", "task=compression", *overrides, f"hydra.run.dir={tmp_path / f'run{i}'}"]
        for i, (overrides, _) in enumerate(all_cases)
    ]
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(argvs)],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failures = []
    for (overrides, needle), res in zip(all_cases, results, strict=True):
        text = res["stderr"]
        if res["code"] in (0, -1) or "Traceback" in text or needle not in text:
            failures.append(f"{overrides}: exit {res['code']}: {text.strip()[-300:]}")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} of {len(all_cases)} failed)"


def test_a_sampler_option_its_builder_does_not_take_is_one_line() -> None:
    """The DDPO paper layer sets sampler.eta for DDIM; a flow sampler does not take it: one line
    naming the key and the way out, before anything loads (not a TypeError from the builder)."""
    from rlcm_exp.validation import check_sampler_options

    cfg = compose(overrides=["model=tiny_flux1", "algo=ddpo", "sampler=flow_sde", "task=compression"])
    with pytest.raises(ConfigError, match=r"sampler\.eta=1\.0 is not an option of sampler=flow_sde.*~paper"):
        check_sampler_options(cfg)
    check_sampler_options(
        compose(overrides=["model=tiny_flux1", "algo=ddpo", "sampler=flow_sde", "task=compression", "~paper"])
    )
    check_sampler_options(
        compose(overrides=["model=tiny", "algo=ddpo", "task=compression"])
    )  # the paper's own sampler

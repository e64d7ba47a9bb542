"""The researcher's path on the command line (issue 19): own prompts from a file or a list, model
families that bring their own sizes, `sample RUN_DIR` with the run's model, help that lists only
what applies, `_target_`s checked before loading, and no run folder left by a run that never started.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rlcm_exp.__main__ import created_by_this_command, note_preexisting_dirs, remove_if_unstarted
from rlcm_exp.configs import compose, conf_dir, is_building_block
from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.heldout import seeded_generators
from rlcm_exp.evaluation.runs import load_lora, load_run_config
from rlcm_exp.evaluation.sampling import sample_images
from rlcm_exp.policies.build import build_policy
from rlcm_exp.prompts import prompt_set
from rlcm_exp.validation import check_before_loading, check_targets

from .helpers import SMALL, run_entry, run_in_process

REPO = Path(__file__).resolve().parents[1]


def run_command(module: str, args: list[str], cwd: Path, tiny_cache: str) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in `cwd`, its own process (forked from one that imported the package)."""
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return run_entry(args, env, module=module, cwd=cwd, timeout=300)


# --- own prompts ---------------------------------------------------------------------------------


def test_prompt_set_takes_a_list_then_a_file_then_a_name(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("a red fox\n\n  a blue whale  \n")
    assert prompt_set(name="unseen", file=str(file)) == ["a red fox", "a blue whale"]
    assert prompt_set(name="unseen", file=str(file), prompts=["a cat"]) == ["a cat"]
    assert prompt_set(name="unseen") == ["bike", "fridge", "waterfall", "tractor"]
    with pytest.raises(ConfigError, match="task.prompts.file"):
        prompt_set(file=str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="has no prompts"):
        prompt_set(file=str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="task.prompts.file=path/to/prompts.txt"):
        prompt_set(name="dinosaurs")


@pytest.mark.parametrize("task", sorted(p.stem for p in (conf_dir() / "task").glob("*.yaml")))
def test_every_task_takes_a_prompt_file_and_a_list_from_the_command_line(task: str, tmp_path: Path) -> None:
    # the old hint `task.prompts.file=...` was refused by Hydra ("Key 'file' is not in struct")
    file = tmp_path / "mine.txt"
    file.write_text("a cat\na dog\n")
    cfg = compose(
        overrides=[f"task={task}", f"task.prompts.file={file}", "task.eval_prompts.prompts=[a fox,an owl]"]
    )
    from hydra.utils import instantiate

    assert instantiate(cfg.task.prompts) == ["a cat", "a dog"]
    assert instantiate(cfg.task.eval_prompts) == ["a fox", "an owl"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.prompts.file=/nonexistent/prompts.txt", "task.prompts.file=/nonexistent/prompts.txt"),
        ("task.eval_prompts.file=/nonexistent/p.txt", "task.eval_prompts.file=/nonexistent/p.txt"),
        ("task.eval_prompts.prompts=[]", "task.eval_prompts.prompts"),
    ],
)
def test_a_bad_prompt_source_names_its_key_before_loading(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_before_loading(compose(overrides=["model=tiny", "task=compression", override]))


def test_training_uses_a_prompt_file_and_held_out_prompts_from_a_list(tiny_cache, tmp_path: Path) -> None:
    file = tmp_path / "mine.txt"
    file.write_text("a green cube\na yellow kite\n")
    run = tmp_path / "run"
    run_in_process(
        [
            *SMALL,
            "train.epochs=1",
            f"task.prompts.file={file}",
            "task.eval_prompts.prompts=[a purple owl,a grey cloud]",
            "train.eval_every=1",
            "train.eval_seeds=1",
            "train.dump_rollouts=true",
        ],
        run,
    )
    used = set()
    for path in (run / "rollouts").glob("*.pt"):
        used |= set(torch.load(path, weights_only=True)["prompts"])
    assert used == {"a green cube", "a yellow kite"}, used
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert set(evals[0]["eval_per_prompt"]) == {"a purple owl", "a grey cloud"}


# --- model families bring their sizes -------------------------------------------------------------

TOY_EXPERIMENTS = [
    "quickstart",
    "toy/rlcm_compression",
    "toy/rlcm_alignment",
    "toy/ddpo_compression",
    "toy/ddpo_alignment",
    "toy/grpo_compression",
    "toy/grpo_alignment",
    "toy/rebel_compression",
]


@pytest.mark.parametrize("experiment", TOY_EXPERIMENTS)
def test_model_defaults_leave_the_toy_experiments_unchanged(experiment: str) -> None:
    with_defaults = compose(overrides=[f"experiment={experiment}"])
    without = compose(overrides=[f"experiment={experiment}", "~model_defaults"])
    assert OmegaConf.to_container(with_defaults) == OmegaConf.to_container(without)


@pytest.mark.parametrize(
    ("algo", "experiment"),
    [
        ("rlcm", "toy/rlcm_compression"),
        ("ddpo", "toy/ddpo_compression"),
        ("grpo", "toy/grpo_compression"),
        ("rebel", "toy/rebel_compression"),
    ],
)
def test_model_toy_brings_the_toy_experiment_sizes(algo: str, experiment: str) -> None:
    plain = compose(overrides=["model=toy", "task=toy_compression", f"algo={algo}"])
    tuned = compose(overrides=[f"experiment={experiment}"])
    shorter = {"grpo": (40, 24), "rebel": (40, 24), "ddpo": (45, 34)}  # CI experiments: fewer epochs, stated
    if algo in shorter:
        assert (plain.train.epochs, tuned.train.epochs) == shorter[algo]
        tuned.train.epochs = plain.train.epochs
    keys = (
        "train",
        "optimizer",
        "sampler.num_steps",
        "algo.lora",
        "algo.ppo",
        "algo.stat_tracker",
        "algo.loss",
    )
    for key in (*keys, "algo.group_size", "algo.advantage"):
        a, b = OmegaConf.select(plain, key), OmegaConf.select(tuned, key)
        a, b = (OmegaConf.to_container(x) if OmegaConf.is_config(x) else x for x in (a, b))
        assert a == b, key
    assert compose(overrides=["model=toy", "train.epochs=3"]).train.epochs == 3  # the command line wins


# --- sample RUN_DIR -------------------------------------------------------------------------------


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sample_from_a_run_dir_uses_the_run_model_and_lora(tiny_cache, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_in_process([*SMALL, "train.epochs=1", "optimizer.lr=0.05"], run)
    out = tmp_path / "out"
    # no model= and no sampler: conf/sample.yaml's defaults are LCM-Dreamshaper (a hub download, refused
    # offline) at 8 steps; the run's tiny model and 4 steps must be used instead
    overrides = [f"checkpoint={run}", "prompts=[a red cat,a blue dog]", "seed=3", f"out={out}"]
    records = sample_images(compose("sample", overrides), overrides)
    assert [r["steps"] for r in records] == [4, 4] and records[0]["checkpoint"]

    # the trained policy, built from the run's own config, draws the same images for the same seeds
    policy = build_policy(load_run_config(run), "cpu")
    load_lora(policy, run)
    images = policy.sample(["a red cat", "a blue dog"], seeded_generators([3, 4], "cpu")).images
    for record, image in zip(records, images, strict=True):
        expected = (image.clamp(0, 1) * 255).round().permute(1, 2, 0).to(torch.int16).numpy()
        assert np.abs(png(out / record["file"]) - expected).max() <= 1  # PNG rounding only

    # a key on the command line is applied on top of the run's group
    overrides = [f"checkpoint={run}", "prompts=[a cat]", "sampler.num_steps=2", f"out={tmp_path / 'two'}"]
    assert sample_images(compose("sample", overrides), overrides)[0]["steps"] == 2


@pytest.mark.subprocess
def test_a_lora_that_does_not_fit_the_model_is_exit_2_naming_the_checkpoint(
    tiny_cache, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run_in_process([*SMALL, "train.epochs=1"], run)
    proc = run_command(
        "rlcm_exp.sample",
        [f"checkpoint={run}", "model=toy", "prompts=[a cat]", f"out={tmp_path / 'out'}"],
        tmp_path,
        tiny_cache,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"checkpoint={run}" in proc.stderr and "does not fit" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- help, targets, failed starts -----------------------------------------------------------------

HIDDEN = ("paper:", "model_defaults", "reproduce:", "hydra/help", "hydra/job_logging")


def listed_groups(help_text: str) -> dict[str, set[str]]:
    """GROUP -> options of the help's '== Groups ==' section ("GROUP=  a, b, c"; descriptions indented)."""
    section = help_text.split("== Groups (GROUP=OPTION) ==")[1].split("== Config ==")[0]
    section = section.split("== Applied automatically")[0]  # the automatic layers are no GROUP= options
    found = (re.match(r"^(\S+)=  (.*)$", line) for line in section.splitlines())
    return {m.group(1): {o.strip() for o in m.group(2).split(",")} for m in found if m}


def shipped_options(group: str) -> set[str]:
    root = conf_dir() / group
    return {
        str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not is_building_block(p)
    }


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("module", "groups"),
    [
        (
            "rlcm_exp",
            {
                "model",
                "algo",
                "task",
                "reward",
                "reward_normalisation",
                "sampler",
                "optimizer",
                "logger",
                "experiment",
                "hydra/launcher",
            },
        ),
        ("rlcm_exp.sample", {"model", "sampler"}),
        ("rlcm_exp.evaluate", {"model", "sampler", "task", "reward"}),
    ],
)
def test_help_lists_only_the_groups_that_apply_and_all_their_options(
    module: str, groups: set[str], tiny_cache, tmp_path: Path
) -> None:
    proc = run_command(module, ["--help"], tmp_path, tiny_cache)
    assert proc.returncode == 0, proc.stderr
    listed = listed_groups(proc.stdout)
    assert set(listed) == groups
    for group, options in listed.items():
        assert options == shipped_options(group), (
            f"{module} --help, {group}: {options ^ shipped_options(group)}"
        )
    groups = proc.stdout.split("== Config ==")[0].split("== Applied automatically")[0]
    assert not [word for word in HIDDEN if word in groups]


def test_a_typo_in_a_target_is_one_line_naming_the_key(tmp_path: Path) -> None:
    cfg = compose(
        overrides=[
            "model=tiny",
            "task=compression",
            "reward=custom",
            "reward._target_=tests.user_reward.nosuch",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"^reward\._target_=tests\.user_reward\.nosuch: cannot be imported"
    ):
        check_targets(cfg)
    check_targets(compose(overrides=["reward=custom", "reward._target_=tests.user_reward.mean_red"]))


@pytest.mark.subprocess
def test_a_run_that_never_started_leaves_no_folder(tiny_cache, tmp_path: Path) -> None:
    bad = ["model=tiny", "task=compression", "reward=custom", "reward._target_=my_rewardz.redness"]
    proc = run_command("rlcm_exp", bad, tmp_path, tiny_cache)  # the default timestamped run dir
    assert proc.returncode == 2 and "reward._target_=my_rewardz.redness" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not any((tmp_path / "outputs").rglob("*")), list((tmp_path / "outputs").rglob("*"))
    # a folder named on the command line that existed before is kept, with whatever it holds
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    proc = run_command("rlcm_exp", [*bad, f"hydra.run.dir={mine}"], tmp_path, tiny_cache)
    assert proc.returncode == 2 and (mine / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty_but_mine"
    empty.mkdir()
    run_command("rlcm_exp", [*bad, f"hydra.run.dir={empty}"], tmp_path, tiny_cache)
    assert empty.is_dir()


def test_only_hydra_files_in_a_folder_this_command_created_are_removed(tmp_path: Path) -> None:
    def hydra_dir(path: Path, extra: str | None = None) -> Path:
        (path / ".hydra").mkdir(parents=True)
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (path / ".hydra" / name).write_text("{}")
        (path / "__main__.log").write_text("")
        if extra:
            (path / extra).write_text("x")
        return path

    gone = hydra_dir(tmp_path / "day" / "run")
    remove_if_unstarted(gone, "__main__.log", date_folder=True)
    assert not gone.exists() and not (tmp_path / "day").exists()
    for extra in ("config.yaml", "metrics.jsonl", "notes.txt"):
        kept = hydra_dir(tmp_path / extra, extra)
        remove_if_unstarted(kept, "__main__.log")
        assert (kept / extra).is_file() and (kept / ".hydra").is_dir()
    odd = hydra_dir(tmp_path / "odd")
    (odd / ".hydra" / "mine.txt").write_text("x")
    remove_if_unstarted(odd, "__main__.log")
    assert (odd / ".hydra" / "mine.txt").is_file()

    existing = tmp_path / "existing"
    existing.mkdir()
    import rlcm_exp.__main__ as cli

    cli.PREEXISTING = note_preexisting_dirs([f"hydra.run.dir={existing}", "seed=1"])
    try:
        assert not created_by_this_command(existing)
        assert created_by_this_command(tmp_path / "fresh")
        cli.PREEXISTING = note_preexisting_dirs(["hydra.run.dir=${oc.env:HOME}/x"])
        assert not created_by_this_command(tmp_path / "fresh")  # cannot be told: kept
    finally:
        cli.PREEXISTING = []

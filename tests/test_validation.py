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

from .helpers import run_entry

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
    "seed": ["-1", "1.5", "s", "4294967296"],
    "optimizer.betas": ["0.5", "[0.9,0.99,0.5]", "[a,b]", "[2,0.9]", "null"],
    "algo.lora.target_modules": ["[]", "to_q", "[1,2]", "['']"],
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
    ("mixed_precision=fp16 device=cpu", "mixed_precision=fp16"),
    ("hydra.run.dir=/tmp/" + "d" * 300 + "/run", "hydra.run.dir"),  # a name too long
    ("hydra.run.dir=/proc/self/rlcm_run", "hydra.run.dir"),  # no folder can be made there, root or not
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
    # one process (forked from one that imported the package: helpers.run_entry) runs every case
    proc = run_entry(argvs, {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, driver=DRIVER, timeout=900)
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


# --- inputs that are not config values: files, folders, devices (checked in process, no model loads) ---


def test_a_prompt_file_that_is_not_utf8_is_named_without_its_bytes(tmp_path: Path) -> None:
    from rlcm_exp.validation import check_prompt_sources

    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a cat\n" + bytes(range(128, 256)) * 32)  # 4 KB of invalid UTF-8
    with pytest.raises(ConfigError) as info:
        check_prompt_sources(compose(overrides=["model=tiny", f"task.prompts.file={bad}"]))
    message = str(info.value)
    assert (
        str(bad) in message
        and "task.prompts.file" in message
        and "not UTF-8" in message
        and "line 2" in message
    )
    assert len(message) < 300 and "\\x" not in message


def test_device_cuda_without_a_gpu_and_fp16_on_a_cpu_are_refused() -> None:
    import torch

    from rlcm_exp.models.precision import resolve_precision
    from rlcm_exp.validation import check_device

    with pytest.raises(ConfigError, match="mixed_precision=fp16 needs a CUDA GPU"):
        resolve_precision("fp16", None, cuda=False, env={})
    with pytest.raises(ConfigError, match="mixed_precision=fp16 needs a CUDA GPU"):  # set by the launcher
        resolve_precision("auto", None, cuda=False, env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert resolve_precision("bf16", None, cuda=False, env={}).mixed_precision == "bf16"
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device=cuda:99"):
            check_device(compose(overrides=["model=tiny", "device=cuda:99"]))
    else:
        with pytest.raises(ConfigError, match="device=cuda: no CUDA GPU is visible"):
            check_device(compose(overrides=["model=tiny", "device=cuda"]))


def test_output_folders_that_cannot_be_written_are_one_line(tmp_path: Path) -> None:
    import os

    from rlcm_exp.configs import probe_folder

    afile = tmp_path / "afile"
    afile.write_text("x")
    for folder, reason in [
        (afile, "is a file"),
        (afile / "run", "Not a directory"),
        (tmp_path / ("d" * 300) / "run", "File name too long"),
        (Path("/proc/self/rlcm_run"), "cannot be created"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            probe_folder(folder, "out=X")
    probe_folder(tmp_path / "new" / "deeper", "out=X")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing behind
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if not os.access(read_only, os.W_OK):  # root writes anywhere: nothing to refuse then
            with pytest.raises(ConfigError, match="Permission denied"):
                probe_folder(read_only, "out=X")
    finally:
        read_only.chmod(0o755)


def test_evaluate_and_sample_name_a_missing_or_damaged_checkpoint(tmp_path: Path) -> None:
    from rlcm_exp.evaluation.runs import config_for_checkpoint

    from .helpers import compose_eval

    with pytest.raises(ConfigError, match="checkpoint=/missing/run: no such file or folder"):
        config_for_checkpoint(compose_eval(["checkpoint=/missing/run"]), [])
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ConfigError, match="the LoRA does not load"):
        config_for_checkpoint(compose_eval([f"checkpoint={tmp_path}"]), [])
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "final").write_text("a file where the folder was")
    with pytest.raises(ConfigError, match="no pytorch_lora_weights.safetensors there"):
        config_for_checkpoint(compose_eval([f"checkpoint={tmp_path / 'run'}"]), [])


def test_evaluate_refuses_an_output_folder_it_cannot_write_before_loading() -> None:
    from rlcm_exp.evaluation.suite import run_evaluation

    from .helpers import compose_eval

    with pytest.raises(ConfigError, match="out=/proc/self/rlcm_eval: the folder cannot be created"):
        run_evaluation(compose_eval(["model=tiny", "out=/proc/self/rlcm_eval"]), ["model=tiny"])


def test_garbage_in_metrics_is_named_by_read_records_and_compare(tmp_path: Path, capsys) -> None:
    import rlcm_exp
    from rlcm_exp.compare import main as compare_main

    run = tmp_path / "sweep" / "run"
    run.mkdir(parents=True)
    OmegaConf.save(compose(overrides=["model=tiny"]), run / "config.yaml", resolve=False)
    for garbage in (b'{"epoch": 0, "reward_mean": 1.0}\n[1, 2]\n', b"\xff\xfe\x00garbage\n", b"42\n"):
        (run / "metrics.jsonl").write_bytes(garbage)
        with pytest.raises(ConfigError, match="metrics.jsonl"):
            rlcm_exp.read_records(run)
        assert compare_main([str(tmp_path / "sweep")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "metrics.jsonl" in err and err.count("\n") == 0
    (run / "metrics.jsonl").write_text('{"epoch": 0, "reward_mean": 1.0}\n')
    assert compare_main([str(tmp_path / "sweep"), "--out", "/proc/self/rlcm/compare.png"]) == 2
    assert "--out /proc/self/rlcm/compare.png: the folder cannot be created" in capsys.readouterr().err
    (run / "config.yaml").write_bytes(b"\xff: [unclosed")
    with pytest.raises(ConfigError, match="config.yaml"):
        rlcm_exp.read_records(run)


def test_the_api_honours_hydra_run_dir(tmp_path: Path) -> None:
    from rlcm_exp.api import run_folder

    assert run_folder(["model=tiny", f"hydra.run.dir={tmp_path}"], None) == (["model=tiny"], tmp_path)
    assert run_folder(["model=tiny"], tmp_path) == (["model=tiny"], tmp_path)
    with pytest.raises(ConfigError, match="two folders"):
        run_folder([f"hydra.run.dir={tmp_path / 'a'}"], tmp_path / "b")
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        run_folder([f"hydra.sweep.dir={tmp_path}"], None)


@pytest.mark.subprocess
def test_sample_out_a_file_or_an_uncreatable_path_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for out in (afile, afile / "samples", tmp_path / ("d" * 300)):
        res = subprocess.run(
            [sys.executable, "-m", "rlcm_exp.sample", "model=tiny", f"out={out}"],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.startswith("error: out=") and res.stderr.strip().count("\n") == 0
    assert afile.read_text() == "mine"


def test_a_checkpoint_folder_replaced_by_a_file_is_refused(tmp_path: Path) -> None:
    from rlcm_exp.training.checkpoint import check_checkpoint_folders

    check_checkpoint_folders(tmp_path)  # no checkpoints yet: nothing to refuse
    (tmp_path / "checkpoints").write_text("a file")
    with pytest.raises(ConfigError, match="checkpoints: a checkpoint folder was replaced by a file"):
        check_checkpoint_folders(tmp_path)
    (tmp_path / "checkpoints").unlink()
    (tmp_path / "checkpoints" / "epoch_2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "epoch_4").write_text("a file")
    with pytest.raises(ConfigError, match="epoch_4: a checkpoint folder"):
        check_checkpoint_folders(tmp_path)
    (tmp_path / "checkpoints" / "epoch_4").unlink()
    (tmp_path / "checkpoints" / "final").symlink_to(tmp_path / "checkpoints" / "epoch_2")
    with pytest.raises(ConfigError, match="final: .* or a link"):
        check_checkpoint_folders(tmp_path)

"""Nothing a user keeps is lost, and bad input is refused before any model loads (issue 18):
the export and the sampler never replace files they did not write, and a resolution the VAE cannot
produce, or an empty prompt list, is refused with the key's name before any weights load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation import export as export_lib
from rlcm_exp.evaluation import sampling
from rlcm_exp.evaluation.export import MANIFEST, export
from rlcm_exp.evaluation.sampling import sample_images
from rlcm_exp.export import main as export_main
from rlcm_exp.models.family import ModelFamily, check_resolution
from rlcm_exp.models.hub import MemberSource
from rlcm_exp.policies.build import build_policy
from rlcm_exp.toy.family import toy_family

from .helpers import CONF, SMALL, run_entry

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_lora_weights.safetensors"


def composed(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config, overrides=overrides)


def lora(version: str) -> bytes:
    """A small valid safetensors file, told apart by its metadata: the LoRA export copies the weights
    file after checking that it loads, so it need not fit a model."""
    import torch
    from safetensors.torch import save

    return save({"unet.a.lora.down.weight": torch.zeros(1, 2)}, metadata={"version": version})


@pytest.fixture()
def run_dir(tiny_cache, tmp_path: Path) -> Path:
    """A run dir as training leaves it (config.yaml + checkpoints/final), without training."""
    run = tmp_path / "run"
    (run / "checkpoints" / "final").mkdir(parents=True)
    OmegaConf.save(composed("config", [*SMALL, "train.epochs=1"]), run / "config.yaml", resolve=True)
    (run / "checkpoints" / "final" / WEIGHTS).write_bytes(lora("v1"))
    return run


def no_staging_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".export-tmp")]


def listed(folder: Path) -> set[str]:
    return set(json.loads((folder / MANIFEST).read_text())["files"])


# --- export: never deletes what it did not write --------------------------------------------------


def test_export_refuses_a_non_empty_folder_without_overwrite(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--out.*not empty.*--overwrite"):
        export(run_dir, "lora", out)
    assert (
        sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    )
    assert no_staging_left(tmp_path)


def test_a_second_export_to_the_default_place_is_refused_and_keeps_user_files(run_dir: Path) -> None:
    target = export(run_dir, "lora")
    assert target == run_dir / "export" / "lora"
    assert listed(target) == {WEIGHTS, "README.md"}
    (target / "my_image.png").write_bytes(b"user")
    with pytest.raises(ConfigError, match=r"--out \(default .*--overwrite"):
        export(run_dir, "lora")
    assert (target / "my_image.png").read_bytes() == b"user"


def test_overwrite_replaces_only_the_files_the_export_listed(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "keep.bin").write_bytes(b"mine too")
    # as if an earlier export had written a file this one no longer writes: it goes, nothing else
    (out / "stale.bin").write_bytes(b"old")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["stale.bin"] = export_lib._digest(out / "stale.bin")
    (out / MANIFEST).write_text(json.dumps(manifest))
    (run_dir / "checkpoints" / "final" / WEIGHTS).write_bytes(lora("v2"))

    export(run_dir, "lora", out, overwrite=True)
    assert (out / WEIGHTS).read_bytes() == lora("v2")
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "sub" / "keep.bin"
    ).read_bytes() == b"mine too"
    assert not (out / "stale.bin").exists()
    assert listed(out) == {WEIGHTS, "README.md"}
    assert no_staging_left(tmp_path)


def test_overwrite_refuses_to_replace_a_file_it_did_not_write(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own readme")  # an export would write README.md: not listed
    with pytest.raises(ConfigError, match=r"README.md \(not written by an export\)"):
        export(run_dir, "lora", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    assert (out / "README.md").read_text() == "my own readme"
    assert no_staging_left(tmp_path)


def test_overwrite_refuses_a_listed_file_the_user_changed(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    (out / "README.md").write_text("my edits to the model card")
    with pytest.raises(ConfigError, match=r"README.md \(changed since"):
        export(run_dir, "lora", out, overwrite=True)
    assert (out / "README.md").read_text() == "my edits to the model card"


def test_a_manifest_naming_a_path_outside_the_folder_deletes_nothing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    (out / MANIFEST).write_text(json.dumps({"files": {"../precious.txt": "x", WEIGHTS: "y"}}))
    with pytest.raises(ConfigError, match=r"\.\./precious\.txt"):
        export(run_dir, "lora", out, overwrite=True)
    (out / MANIFEST).write_text("{torn")
    with pytest.raises(ConfigError, match="cannot be read"):
        export(run_dir, "lora", out, overwrite=True)
    assert outside.read_text() == "keep" and (out / WEIGHTS).read_bytes() == lora("v1")


def test_a_sibling_tmp_folder_is_never_touched(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    sibling = tmp_path / "out.tmp"
    sibling.mkdir()
    (sibling / "work.txt").write_text("mine")
    export(run_dir, "lora", out)
    export(run_dir, "lora", out, overwrite=True)
    assert (sibling / "work.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp", "run"]


def test_overwrite_never_deletes_through_a_symlinked_folder(run_dir: Path, tmp_path: Path) -> None:
    """A listed file under a folder that is now a link out of --out: refused whole, nothing deleted
    (there or outside), even when the file outside is byte for byte what the export wrote."""
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    (out / "unet").mkdir()
    (out / "unet" / "weights.bin").write_bytes(b"exported")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["unet/weights.bin"] = export_lib._digest(out / "unet" / "weights.bin")
    (out / MANIFEST).write_text(json.dumps(manifest))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "weights.bin").write_bytes(b"exported")  # same bytes: the digest check alone would pass
    (out / "unet" / "weights.bin").unlink()
    (out / "unet").rmdir()
    (out / "unet").symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError, match=r"unet/weights.bin \(behind a link\)"):
        export(run_dir, "lora", out, overwrite=True)
    assert (outside / "weights.bin").read_bytes() == b"exported"
    assert sorted(p.name for p in out.iterdir()) == before and (out / WEIGHTS).read_bytes() == lora("v1")
    assert no_staging_left(tmp_path)


def test_a_truncated_lora_is_refused_before_anything_is_written(run_dir: Path, tmp_path: Path) -> None:
    weights = run_dir / "checkpoints" / "final" / WEIGHTS
    weights.write_bytes(lora("v1")[:-3])
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"{WEIGHTS}: the LoRA does not load"):
        export(run_dir, "lora", out)
    assert not out.exists() and no_staging_left(tmp_path)
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="does not load"):
        export(run_dir, "pipeline", out)
    assert not out.exists() and no_staging_left(tmp_path)


def test_an_output_folder_that_cannot_be_written_is_one_error(run_dir: Path, tmp_path: Path) -> None:
    """No folder can be made in /proc/self, whoever runs the test (root ignores a read-only mode)."""
    with pytest.raises(ConfigError, match="--out /proc/self/rlcm_export: cannot write beside it"):
        export(run_dir, "lora", "/proc/self/rlcm_export")
    with pytest.raises(ConfigError, match="cannot create its folder"):
        export(run_dir, "lora", tmp_path / ("d" * 300) / "out")


def test_staging_folders_of_a_killed_export_are_removed_by_the_next(run_dir: Path, tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = tmp_path / f".out.{int(dead.stdout)}.0123abcd.export-tmp"  # as a killed export leaves it
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "half.bin").write_bytes(b"partial")
    outside = tmp_path / "keep"
    outside.mkdir()
    (outside / "mine.txt").write_text("mine")
    (stale / "link").symlink_to(outside, target_is_directory=True)
    live = tmp_path / f".out.{os.getpid()}.89abcdef.export-tmp"  # a running export's: kept
    live.mkdir()
    other = tmp_path / f".other.{int(dead.stdout)}.0123abcd.export-tmp"  # another --out's: kept
    other.mkdir()
    export(run_dir, "lora", tmp_path / "out")
    assert not stale.exists() and live.is_dir() and other.is_dir()
    assert (outside / "mine.txt").read_text() == "mine"


def test_a_failed_export_leaves_the_earlier_one_whole(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_lib, "model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        export(run_dir, "lora", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert no_staging_left(tmp_path)


def test_an_overwrite_killed_midway_can_be_finished(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the new files moved in but before the final manifest: every file there is still
    listed (with either content), so the next --overwrite completes and keeps the user's file."""
    out = tmp_path / "out"
    export(run_dir, "lora", out)
    (out / "notes.txt").write_text("mine")
    (run_dir / "checkpoints" / "final" / WEIGHTS).write_bytes(lora("v2"))
    real_replace = os.replace
    manifest_writes = []

    def killed(src, dst) -> None:
        if Path(dst) == out / MANIFEST:
            manifest_writes.append(src)
            if len(manifest_writes) == 2:  # the first lists old + new, the second only new
                raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(export_lib.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export(run_dir, "lora", out, overwrite=True)
    monkeypatch.undo()
    assert (out / WEIGHTS).read_bytes() == lora("v2")
    (run_dir / "checkpoints" / "final" / WEIGHTS).write_bytes(lora("v3"))
    export(run_dir, "lora", out, overwrite=True)
    assert (out / WEIGHTS).read_bytes() == lora("v3") and (out / "notes.txt").read_text() == "mine"
    assert listed(out) == {WEIGHTS, "README.md"} and no_staging_left(tmp_path)


def test_export_refuses_a_file_as_the_output_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("a file")
    with pytest.raises(ConfigError, match="--out .* is a file"):
        export(run_dir, "lora", out, overwrite=True)
    assert out.read_text() == "a file"


def test_export_cli_exit_codes(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    export_main([str(run_dir), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(run_dir), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err and "--overwrite" in err
    export_main([str(run_dir), "--out", str(out), "--overwrite"])
    assert "wrote" in capsys.readouterr().out


def test_pipeline_export_overwrite_keeps_user_files(tiny_family, run_dir: Path, tmp_path: Path) -> None:
    """A real fused pipeline (nested folders): a second export replaces its own files only."""
    from rlcm_exp.models import attach_lora
    from rlcm_exp.models.lora import write_lora_weights
    from rlcm_exp.policies.lcm import build_lcm_policy

    policy = build_lcm_policy(tiny_family, num_steps=4)
    attach_lora(policy.denoiser, 4, 4, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    write_lora_weights(policy.denoiser, run_dir / "checkpoints" / "final")
    out = tmp_path / "pipe"
    export(run_dir, "pipeline", out)
    first = listed(out)
    assert "model_index.json" in first and any(f.startswith("unet/") for f in first)
    (out / "unet" / "my_notes.txt").write_text("mine")
    export(run_dir, "pipeline", out, overwrite=True)
    assert listed(out) == first and (out / "unet" / "my_notes.txt").read_text() == "mine"


# --- sampling: refuses earlier samples unless overwrite=true, and then replaces only its own ---------


@pytest.fixture()
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build a policy (which loads weights) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(sampling, "build_policy", refuse)


def sample(overrides: list[str]) -> list[dict]:
    return sample_images(composed("sample", ["model=tiny", "sampler.num_steps=2", *overrides]))


@pytest.mark.parametrize("prompts", ["prompts=[]", "prompts=null", "prompts=a cat", "prompts=['',x]"])
def test_empty_or_malformed_prompts_are_refused_before_loading(
    tiny_cache, tmp_path: Path, no_model_load, prompts: str
) -> None:
    with pytest.raises(ConfigError, match="prompts="):
        sample([prompts, f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["images_per_prompt=0", "batch_size=0", "batch_size=x", "overwrite=maybe"])
def test_bad_sampling_sizes_are_refused_before_loading(
    tiny_cache, tmp_path: Path, no_model_load, bad: str
) -> None:
    with pytest.raises(ConfigError, match=bad.split("=")[0] + "="):
        sample([bad, f"out={tmp_path / 'out'}"])


def test_earlier_samples_are_refused_before_loading(tiny_cache, tmp_path: Path, no_model_load) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.json").write_text(json.dumps([{"file": "0000.png"}]))
    (out / "0000.png").write_bytes(b"earlier")
    with pytest.raises(ConfigError, match="out=.*already holds samples.*overwrite=true"):
        sample([f"out={out}"])
    assert (out / "0000.png").read_bytes() == b"earlier"
    # a user's PNG of the name sampling would write is refused as well, even with overwrite=true
    (out / "samples.json").unlink()
    with pytest.raises(ConfigError, match="already holds samples"):
        sample([f"out={out}"])
    with pytest.raises(ConfigError, match="0000.png.*not listed"):
        sample([f"out={out}", "overwrite=true"])
    (out / "samples.json").write_text("not json")
    with pytest.raises(ConfigError, match="samples.json.*not written by rlcm_exp.sample"):
        sample([f"out={out}", "overwrite=true"])
    assert (out / "0000.png").read_bytes() == b"earlier"


def test_overwrite_replaces_only_the_earlier_samples(tiny_cache, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = sample([f"out={out}", "prompts=[a cat,a dog]", "images_per_prompt=2"])
    assert [r["file"] for r in first] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    (out / "notes.txt").write_text("mine")
    (out / "mine.png").write_bytes(b"user image")
    second = sample([f"out={out}", "prompts=[a bird]", "overwrite=true", "seed=9"])
    assert [r["seed"] for r in second] == [9]
    assert json.loads((out / "samples.json").read_text()) == second
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000.png", "mine.png", "notes.txt", "samples.json"]
    assert (out / "mine.png").read_bytes() == b"user image"


@pytest.mark.subprocess
def test_sample_cli_refuses_an_empty_prompt_list_with_one_line(tiny_cache, tmp_path: Path) -> None:
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1"}
    args = ["model=tiny", "prompts=[]", f"out={tmp_path / 'out'}"]
    proc = run_entry(args, env, module="rlcm_exp.sample", timeout=300)  # its own (forked) process
    assert proc.returncode == 2, proc.stderr
    assert "prompts=" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "out").glob("*.png"))


# --- resolution: refused before any weights load --------------------------------------------------


@pytest.fixture()
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the resolution was checked")

    monkeypatch.setattr(ModelFamily, "load", refuse)


def test_resolution_is_checked_from_the_vae_config_without_loading(tiny_family, no_weights) -> None:
    check_resolution(tiny_family, "lcm", None)  # 32 px, factor 2
    check_resolution(tiny_family, "diffusion", 64)
    for bad in (33, 0, -32):
        with pytest.raises(ConfigError, match=f"sampler.resolution={bad}.*factor 2"):
            check_resolution(tiny_family, "lcm", bad)
    toy = toy_family()  # a 4x VAE: 34 is even but not a multiple of 4
    with pytest.raises(ConfigError, match="sampler.resolution=34.*factor 4"):
        check_resolution(toy, "lcm", 34)
    # a hub member not on this machine cannot be checked before loading; the policy checks it after
    check_resolution(ModelFamily("hub", lcm=MemberSource(hub_id="nobody/not-downloaded")), "lcm", 33)


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_building_a_policy_refuses_the_resolution_before_loading(
    tiny_cache, no_weights, sampler: str
) -> None:
    cfg = composed("config", [*SMALL, f"sampler={sampler}", "sampler.resolution=33"])
    with pytest.raises(ConfigError, match="sampler.resolution=33"):
        build_policy(cfg, "cpu")


def test_sampling_refuses_the_resolution_before_loading(tiny_cache, tmp_path: Path, no_weights) -> None:
    with pytest.raises(ConfigError, match="sampler.resolution=33"):
        sample([f"out={tmp_path / 'out'}", "sampler.resolution=33"])
    assert not (tmp_path / "out").exists()


@pytest.mark.subprocess
def test_training_cli_refuses_the_resolution_quickly(tiny_cache, tmp_path: Path) -> None:
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1"}
    overrides = ["model=tiny", "task=compression", "sampler.resolution=33", "train.epochs=1"]
    start = time.monotonic()  # its own process, forked from one that imported the package
    proc = run_entry([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "sampler.resolution=33" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert time.monotonic() - start < 120
    assert not (tmp_path / "run" / "checkpoints").exists()

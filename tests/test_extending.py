"""docs/extending.md's worked examples, run as written: each code block is copied into a folder of
the user's own (outside the package), its YAML files on Hydra's search path, and a run trains with
them on the tiny family. An update class named by `algo.update._target_` trains too."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlcm_exp.configs import compose
from rlcm_exp.training.build import train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
TINY = ["model=tiny", "task=compression", "train.epochs=2", "train.samples_per_epoch=4"]
TINY += [
    "train.sample_batch_size=2",
    "train.train_batch_size=2",
    "train.samples_per_step=4",
    "train.eval_every=0",
]


def doc_files() -> dict[str, str]:
    """Each code block of the page by the file its first `# NAME.py|.yaml` comment names."""
    files = {}
    for body in re.findall(r"```(?:python|yaml)\n(.*?)```", DOC.read_text(), re.S):
        names = [line[2:].strip() for line in body.splitlines() if re.fullmatch(r"# [\w/]+\.(py|yaml)", line)]
        if names:
            files[names[0]] = body
    return files


@pytest.fixture
def user_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The page's files in a folder of the user's: modules importable, YAMLs as a config search path."""
    folder = tmp_path / "user"
    for name, body in doc_files().items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for module in ("my_reward", "my_update"):
        sys.modules.pop(module, None)


def test_the_page_has_a_reward_an_update_and_a_family() -> None:
    assert {"my_reward.py", "reward/greenness.yaml", "my_update.py", "algo/last_step.yaml"} <= set(
        doc_files()
    )
    assert "model/my_family.yaml" in doc_files()


def test_the_reward_example_trains(user_folder: Path, tmp_path: Path) -> None:
    cfg = compose("config", [*TINY, "reward=greenness", f"hydra.searchpath=[file://{user_folder}]"])
    assert cfg.reward._target_ == "my_reward.greenness"
    records = train(cfg, tmp_path / "run")
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["reward_mean"])) for r in records)


def test_the_update_example_trains_by_its_algo_file(user_folder: Path, tmp_path: Path) -> None:
    cfg = compose("config", [*TINY, "algo=last_step", f"hydra.searchpath=[file://{user_folder}]"])
    assert cfg.algo["update"]["_target_"] == "my_update.LastStepUpdate" and cfg.algo.name == "last_step"
    records = train(cfg, tmp_path / "run")
    assert [r["optimizer_steps"] for r in records] == [1, 2]  # its own cadence: one step per round
    assert all("ratio_first" not in r and r["grad_norm"] > 0 for r in records)
    lora = load_file(tmp_path / "run" / "checkpoints" / "final" / "pytorch_lora_weights.safetensors")
    up = [t for k, t in lora.items() if "lora_B" in k or "lora.up" in k]
    assert up and any(t.abs().max() > 0 for t in up), "the LoRA never moved (B starts at zero)"


def test_an_update_class_named_by_target_trains(user_folder: Path, tmp_path: Path) -> None:
    """No YAML: algo.update._target_ on the command line, options with +."""
    cfg = compose(
        "config", [*TINY, "algo.update._target_=my_update.LastStepUpdate", "+algo.update.scale=2.0"]
    )
    records = train(cfg, tmp_path / "run")
    assert len(records) == 2 and records[-1]["optimizer_steps"] == 2


def test_the_family_example_loads_local_folders(user_folder: Path, tiny_family) -> None:  # noqa: ANN001
    from rlcm_exp.policies.build import build_policy

    yaml = (user_folder / "model" / "my_family.yaml").read_text()
    yaml = yaml.replace("MY_DIFFUSION_FOLDER", tiny_family.diffusion.local_path)
    yaml = yaml.replace("MY_LCM_FOLDER", tiny_family.lcm.local_path)
    (user_folder / "model" / "my_family.yaml").write_text(yaml)
    cfg = compose(
        "config", ["model=my_family", "sampler.num_steps=2", f"hydra.searchpath=[file://{user_folder}]"]
    )
    policy = build_policy(cfg, "cpu")
    traj = policy.sample(["a cat"], torch.Generator().manual_seed(0))
    assert traj.images.shape == (1, 3, 32, 32) and traj.final_latents.shape[0] == 1

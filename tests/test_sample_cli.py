"""The sampling CLI: PNGs + JSON, per-image seeds, and a trained LoRA really loaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from rlcm_exp.evaluation.sampling import sample_images

from .helpers import CONF, SMALL, run_in_process


def run_sample(overrides: list[str]) -> list[dict]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return sample_images(compose("sample", overrides=overrides))


def test_sample_writes_pngs_and_json_and_loads_the_lora(tiny_cache, tmp_path: Path) -> None:
    run_in_process([*SMALL, "train.epochs=1", "optimizer.lr=0.05"], tmp_path / "run")
    common = ["model=tiny", "sampler.num_steps=4", "prompts=[a red cat,a blue dog]", "seed=5", "batch_size=1"]
    base = run_sample([*common, f"out={tmp_path / 'base'}"])
    run_sample([*common, f"out={tmp_path / 'tuned'}", f"checkpoint={tmp_path / 'run'}"])
    meta = json.loads((tmp_path / "tuned" / "samples.json").read_text())
    assert [m["seed"] for m in meta] == [5, 6] and meta[0]["steps"] == 4 and meta[0]["checkpoint"]
    assert base[0]["prompt"] == "a red cat"
    a = torch.tensor(list(Image.open(tmp_path / "base" / "0000.png").getdata()), dtype=torch.float32)
    b = torch.tensor(list(Image.open(tmp_path / "tuned" / "0000.png").getdata()), dtype=torch.float32)
    assert (a - b).abs().max() > 0, "the LoRA checkpoint did not change the images"
    # per-image generators: the same image whatever the batch size
    rebatched = run_sample([*common, f"out={tmp_path / 'batched'}", "batch_size=2"])
    assert len(rebatched) == 2
    c = torch.tensor(list(Image.open(tmp_path / "batched" / "0001.png").getdata()), dtype=torch.float32)
    d = torch.tensor(list(Image.open(tmp_path / "base" / "0001.png").getdata()), dtype=torch.float32)
    assert (c - d).abs().max() <= 1  # PNG rounding only
    saved = load_file(tmp_path / "run" / "checkpoints" / "final" / "pytorch_lora_weights.safetensors")
    assert saved and all(k.startswith("unet.") for k in saved)

"""The whole toy recipe on its tiny schedule: every stage boundary, saving and loading back."""

from __future__ import annotations

import json

import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from rlcm_exp.toy import recipe


def test_tiny_recipe_saves_loadable_pipelines(tmp_path) -> None:  # noqa: ANN001
    record = recipe.run(tmp_path, seed=0, schedule="tiny")
    assert record["recipe_version"] == recipe.RECIPE_VERSION
    saved = json.loads((tmp_path / "recipe.json").read_text())
    assert saved["schedule"] == "tiny" and "quality" in saved["wall_clock_s"]
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert set(quality["scores"]) == {"train", "heldout"}
    assert "lcm4" in quality["jpeg_bytes_q95_train"]

    # Loaded with no dtype argument: everything runs in float32.
    ddim = StableDiffusionPipeline.from_pretrained(tmp_path / "diffusion", safety_checker=None)
    lcm = LatentConsistencyModelPipeline.from_pretrained(tmp_path / "lcm", safety_checker=None)
    assert type(ddim.scheduler).__name__ == "DDIMScheduler"
    assert type(lcm.scheduler).__name__ == "LCMScheduler"
    assert lcm.unet.config.time_cond_proj_dim is not None
    assert isinstance(CLIPTokenizer.from_pretrained(tmp_path / "lcm" / "tokenizer"), CLIPTokenizer)
    prompt = "a red circle on a blue background"
    gen = torch.Generator().manual_seed(0)
    a = ddim(prompt, num_inference_steps=2, guidance_scale=3.0, generator=gen, output_type="pt").images
    b = lcm(prompt, num_inference_steps=2, guidance_scale=8.0, generator=gen, output_type="pt").images
    for image in (a, b):
        assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

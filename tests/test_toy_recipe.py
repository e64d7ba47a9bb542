"""The whole toy recipe on its tiny schedule: every stage boundary, saving and loading back."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from transformers import CLIPTokenizer

from rlcm_exp.toy import captions, data, runner


@pytest.mark.slow  # the whole recipe at its tiny schedule: ~1-2 minutes on one core (make test runs it)
def test_tiny_recipe_saves_loadable_pipelines(tmp_path) -> None:  # noqa: ANN001
    record = runner.run(tmp_path, runner.RecipeOptions(seed=0, schedule="tiny", caption_noise=0.2))
    assert record["recipe_version"] == runner.RECIPE_VERSION and record["caption_noise"] == 0.2
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


def test_caption_noise_redraws_attributes_and_never_trains_a_held_out_caption() -> None:
    train = data.train_prompts()
    attrs = captions.caption_attributes([train[i % len(train)] for i in range(4000)])
    true = torch.tensor([i % len(train) + 1 for i in range(4000)])  # index into [""] + train
    assert torch.equal(captions.noisy_caption_index(attrs, 0.0, torch.Generator().manual_seed(0)), true)

    idx = captions.noisy_caption_index(attrs, 0.3, torch.Generator().manual_seed(0))
    again = captions.noisy_caption_index(attrs, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)  # reproducible from the generator
    assert int(idx.min()) >= 1 and int(idx.max()) <= len(train)  # a training caption, never "" or held out
    got = captions.caption_attributes([train[i - 1] for i in idx.tolist()])
    changed = (got != attrs).float().mean(0)  # per attribute: re-drawn to another value, not rejected
    # q * (n - 1) / n before the rejections of held-out and same-colour compositions: colour and
    # background ~0.25, shape ~0.2; rejections pull these down a little, never to zero
    assert torch.all(changed > 0.12) and torch.all(changed < 0.3), changed
    assert ((got[:, 0] == got[:, 2]).sum()) == 0


def test_recipe_refuses_a_caption_noise_outside_0_1(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="caption_noise"):
        runner.run(tmp_path, runner.RecipeOptions(schedule="tiny", caption_noise=1.0))

"""The exported LoRA (and fused pipeline) reproduce the trained policy's images in plain diffusers."""

from __future__ import annotations

import torch
from diffusers import LatentConsistencyModelPipeline
from safetensors.torch import load_file

from rlcm_exp.evaluation.export import export
from rlcm_exp.models import attach_lora
from rlcm_exp.models.lora import load_lora_into
from rlcm_exp.policies.lcm import build_lcm_policy

from .helpers import SMALL, run_in_process

PROMPTS = ["a red cat", "a blue dog"]


def pipeline_images(pipe, timesteps: list[int]) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    return pipe(
        PROMPTS,
        num_inference_steps=None,
        timesteps=timesteps,
        guidance_scale=8.0,
        generator=gens,
        output_type="pt",
        height=32,
        width=32,
    ).images


def test_exported_lora_and_pipeline_reproduce_the_trained_policy(tiny_cache, tiny_family, tmp_path) -> None:
    run = tmp_path / "run"
    run_in_process(
        [*SMALL, "train.epochs=1", "optimizer.lr=0.05"], run
    )  # rlcm default LoRA: rank 16, alpha 32
    # the trained policy, rebuilt from its final checkpoint
    policy = build_lcm_policy(tiny_family, num_steps=4)
    attach_lora(policy.denoiser, 16, 32, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    load_lora_into(
        policy.denoiser, load_file(run / "checkpoints" / "final" / "pytorch_lora_weights.safetensors")
    )
    trained = policy.sample(PROMPTS, [torch.Generator().manual_seed(s) for s in (11, 12)]).images

    lora_dir = export(run, "lora")
    assert "rank 16, alpha 32" in (lora_dir / "README.md").read_text()
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_family.lcm.local_path)
    base = pipeline_images(pipe, policy.timesteps.tolist())
    pipe.load_lora_weights(str(lora_dir))
    torch.testing.assert_close(pipeline_images(pipe, policy.timesteps.tolist()), trained, atol=1e-5, rtol=0)
    assert (base - trained).abs().max() > 1e-3  # the LoRA matters

    fused = LatentConsistencyModelPipeline.from_pretrained(export(run, "pipeline"))
    torch.testing.assert_close(pipeline_images(fused, policy.timesteps.tolist()), trained, atol=1e-4, rtol=0)

"""The flow families end to end: the CI smoke runs (Flow-GRPO and RLCM-style training on tiny_sd35 and
tiny_flux1, two epochs each) and the export round trip of each trained run: the exported LoRA loaded
into the stock StableDiffusion3Pipeline / FluxPipeline, and the exported fused pipeline, reproduce the
trained policy's images (deterministic Euler sampling of the member it trained) to 1e-4."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from hydra.utils import instantiate

from rlcm_exp.evaluation.export import export
from rlcm_exp.evaluation.runs import load_lora, load_run_config
from rlcm_exp.policies.flow import FlowPolicy
from rlcm_exp.policies.members import sampler_member

from .helpers import run_in_process

PROMPTS = ["a red cat", "a blue dog on a green background"]
RUNS = [
    (model, algo, sampler)
    for model in ("tiny_sd35", "tiny_flux1")
    for algo, sampler in (("grpo", "flow_sde"), ("rlcm", "flow_consistency"))
]


@pytest.fixture(scope="module", params=RUNS, ids=["-".join(r) for r in RUNS])
def flow_run(request: pytest.FixtureRequest, tiny_cache: str, tmp_path_factory) -> tuple[Path, list[dict]]:
    """`python -m rlcm_exp model=M algo=A sampler=S task=compression train.epochs=2`, in process
    (the first line of issue 28's CI: ~15-35 s of one core each, held-out evaluation included)."""
    model, algo, sampler = request.param
    run_dir = tmp_path_factory.mktemp(f"{model}_{algo}") / "run"
    overrides = [f"model={model}", f"algo={algo}", f"sampler={sampler}", "task=compression", "train.epochs=2"]
    return run_dir, run_in_process(overrides, run_dir)


@pytest.mark.slow
def test_flow_grpo_and_rlcm_smoke_runs(flow_run) -> None:
    _, records = flow_run
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(abs(r["ratio_first"] - 1) < 1e-5 for r in records)


def euler(pipe: Any, guidance: float, steps: int, output: str = "pt") -> torch.Tensor:
    """The stock pipeline's Euler sampling from seed 1: images (output "pt") or final latents
    ("latent"; FLUX's unpacked to (B, C, h, w), as the policy holds them)."""
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=32,
        width=32,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(1),
        output_type=output,
    ).images
    if output == "latent" and isinstance(pipe, FluxPipeline):
        return FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor)
    return out


@pytest.mark.slow
def test_export_round_trip_reproduces_the_trained_policy(flow_run, tmp_path: Path) -> None:
    run_dir, _ = flow_run
    cfg = load_run_config(run_dir)
    family, member = instantiate(cfg.model), sampler_member(cfg.sampler)
    flux = family.name == "tiny_flux1"
    guidance, steps = float(cfg.sampler.guidance_scale), int(cfg.sampler.num_steps)
    lora_dir = export(run_dir, "lora", tmp_path / "lora")
    pipe_dir = export(run_dir, "pipeline", tmp_path / "pipeline")

    # the trained policy, deterministic: Euler steps (CPS with eta 0) over the member it trained
    policy = FlowPolicy(family.load(member), "cps", member, steps, guidance, resolution=32, eta=0.0)
    load_lora(policy, run_dir)  # as `sample` and `evaluate` load a run's LoRA
    trained = policy.sample(PROMPTS, torch.Generator().manual_seed(1))

    cls: Any = FluxPipeline if flux else StableDiffusion3Pipeline
    stock = cls.from_pretrained(family.member(member).local_path)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(lora_dir))
    torch.testing.assert_close(euler(stock, guidance, steps), trained.images, atol=1e-4, rtol=0)
    lora_latents = euler(stock, guidance, steps, "latent")
    torch.testing.assert_close(lora_latents, trained.final_latents, atol=1e-5, rtol=0)
    stock.unload_lora_weights()  # not vacuous: the LoRA moves the latents well beyond the tolerance
    assert (euler(stock, guidance, steps, "latent") - lora_latents).abs().max() > 1e-4

    fused: Any = DiffusionPipeline.from_pretrained(pipe_dir)
    assert type(fused) is cls
    fused.set_progress_bar_config(disable=True)
    torch.testing.assert_close(euler(fused, guidance, steps), trained.images, atol=1e-4, rtol=0)

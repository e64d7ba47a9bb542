"""Model families beyond the paper's: LCM without a guidance embedding (LCM-LoRA), the SD 1.5 +
LCM-LoRA family on its tiny stand-in, members read from local folders, and the clear errors."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.runs import load_lora
from rlcm_exp.models import hub
from rlcm_exp.models.family import ModelFamily, tiny_sd15_lcm_lora_family, tiny_sdxl_family
from rlcm_exp.models.hub import AdapterSource, MemberSource
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.ddim import build_ddim_policy
from rlcm_exp.policies.lcm import build_lcm_policy

from .helpers import run_in_process

PROMPTS = ["a red cat", "a blue dog", "a green bird"]


@pytest.fixture(scope="module")
def lora_family(tiny_cache: str) -> ModelFamily:
    return tiny_sd15_lcm_lora_family(tiny_cache)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub, "_WARNED", set())  # each test sees its own warnings


def lcm_lora_reference(family: ModelFamily) -> Any:
    """LCM-LoRA as diffusers documents it, independently of our loader: the base as a
    StableDiffusionPipeline, the LCM-LoRA loaded and fused, an LCMScheduler. (diffusers'
    LatentConsistencyModelPipeline cannot run such a UNet: it needs time_cond_proj_dim.)"""
    source = family.lcm
    assert source is not None and source.lcm_lora is not None and source.local_path is not None
    pipe: Any = StableDiffusionPipeline.from_pretrained(source.local_path, safety_checker=None)
    pipe.load_lora_weights(source.lcm_lora.local_path)
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ LCM without a guidance embedding


def test_the_lcm_member_is_the_base_with_the_lcm_lora_fused(lora_family) -> None:
    lcm, base = lora_family.load("lcm"), lora_family.load("diffusion")
    assert isinstance(lcm.scheduler, LCMScheduler) and lcm.unet.config.time_cond_proj_dim is None
    assert not getattr(lcm.unet, "peft_config", None)  # fused and unloaded: the RL LoRA trains alone
    changed = [
        name
        for (name, a), b in zip(lcm.unet.named_parameters(), base.unet.parameters(), strict=True)
        if not torch.equal(a, b)
    ]
    assert any("attn2.to_k" in n for n in changed) and any("conv1" in n for n in changed)
    ref = lcm_lora_reference(lora_family)
    ref.unload_lora_weights()  # keeps the fused weights, drops the (merged) adapter layers
    for a, b in zip(lcm.unet.parameters(), ref.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(("num_steps", "guidance"), [(4, 1.0), (4, 1.5), (2, 2.0), (8, 1.0)])
def test_lcm_lora_images_equal_the_diffusers_pipeline(lora_family, num_steps: int, guidance: float) -> None:
    policy = build_lcm_policy(lora_family, num_steps=num_steps, guidance_scale=guidance)
    assert policy.resolution == 32  # read from the folder: UNet sample_size 16 x VAE factor 2
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(3))
    out = lcm_lora_reference(lora_family)(
        PROMPTS,
        num_inference_steps=None,
        timesteps=policy.timesteps.tolist(),
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
        height=32,
        width=32,
    ).images
    torch.testing.assert_close(traj.images, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_lcm_lora_transitions_equal_the_pipeline_steps(lora_family, guidance: float) -> None:
    """Every recorded transition: the pipeline's latents after each step (callback), same seed."""
    policy = build_lcm_policy(lora_family, num_steps=4, guidance_scale=guidance)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(5))
    seen: list[torch.Tensor] = []

    def record(pipe, i, t, kwargs):  # noqa: ANN001, ANN202 (diffusers' callback signature)
        seen.append(kwargs["latents"].clone())
        return {}

    lcm_lora_reference(lora_family)(
        PROMPTS,
        num_inference_steps=None,
        timesteps=policy.timesteps.tolist(),
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
        height=32,
        width=32,
        callback_on_step_end=record,
    )
    for k in range(policy.num_transitions):
        torch.testing.assert_close(traj.next_latents[:, k], seen[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("sampler", "guidance", "doubled"),
    [("lcm", 1.0, False), ("lcm", 1.5, True), ("ddim", 1.0, False), ("ddim", 5.0, True)],
)
def test_first_ratio_is_one_for_every_sampler_cfg_on_and_off(lora_family, sampler, guidance, doubled) -> None:
    policy = make_policy(lora_family, sampler, guidance)  # the same builders, any family
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    x, t, kwargs = policy.denoiser_inputs(traj.latents[:, 0], 0, traj.conditioning, training=True)
    assert x.shape[0] == (2 if doubled else 1) * len(PROMPTS) and "timestep_cond" not in kwargs
    steps = torch.arange(policy.num_transitions).repeat(len(PROMPTS))
    rows = torch.arange(len(PROMPTS)).repeat_interleave(policy.num_transitions)
    new = policy.log_prob(
        traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
    )
    assert (torch.exp(new - traj.log_probs[rows, steps]) - 1).abs().max().item() <= 1e-5


def test_high_guidance_on_an_lcm_lora_warns(lora_family, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rlcm_exp.policies.lcm"):
        build_lcm_policy(lora_family, num_steps=2, guidance_scale=8.0)
    assert "sampler.guidance_scale=8.0" in caplog.text and "1-2" in caplog.text


# ------------------------------------------------------------------ local folders (issue 19)


def test_resolution_and_kind_are_read_from_the_folder(tiny_family, caplog) -> None:
    base, lcm = tiny_family.diffusion.local_path, tiny_family.lcm.local_path
    family = ModelFamily("local", diffusion=MemberSource(local_path=base), lcm=MemberSource(local_path=lcm))
    with caplog.at_level(logging.WARNING, logger="rlcm_exp.models.hub"):
        assert family.member("diffusion").resolution == 32 and family.member("lcm").resolution == 32
    assert not caplog.text  # folder and configuration agree: nothing to say
    assert hub.folder_kind(MemberSource(local_path=lcm)) == "lcm"
    assert hub.folder_kind(MemberSource(local_path=base)) == "diffusion"


def test_an_override_that_disagrees_with_the_folder_warns(tiny_family, caplog) -> None:
    base, lcm = tiny_family.diffusion.local_path, tiny_family.lcm.local_path
    swapped = ModelFamily(
        "swapped", diffusion=MemberSource(local_path=lcm), lcm=MemberSource(local_path=base, resolution=64)
    )
    with caplog.at_level(logging.WARNING, logger="rlcm_exp.models.hub"):
        assert swapped.member("lcm").resolution == 64  # the configured value is kept
        swapped.member("diffusion")
    assert "model.lcm.resolution=64" in caplog.text and "native side is 32" in caplog.text
    assert "looks like a diffusion model" in caplog.text and "looks like a lcm model" in caplog.text


def test_the_scheduler_class_alone_marks_an_lcm_folder(tiny_family, tmp_path) -> None:
    folder = tmp_path / "sd_with_lcm_scheduler"
    shutil.copytree(tiny_family.diffusion.local_path, folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "LCMScheduler"}))
    assert hub.folder_kind(MemberSource(local_path=str(folder))) == "lcm"


# ------------------------------------------------------------------ clear errors, before loading


def test_a_folder_that_is_not_a_pipeline_is_refused_before_loading(tmp_path) -> None:
    family = ModelFamily("x", lcm=MemberSource(local_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"model\.lcm\.local_path=.*no diffusers pipeline folder"):
        family.member("lcm")


def test_a_missing_lcm_lora_is_refused(tiny_family, tmp_path) -> None:
    base = tiny_family.diffusion.local_path
    family = ModelFamily(
        "x", lcm=MemberSource(local_path=base, lcm_lora=AdapterSource(local_path=str(tmp_path)))
    )
    with pytest.raises(ConfigError, match=r"model\.lcm\.lcm_lora\.local_path=.*no LCM-LoRA there"):
        build_lcm_policy(family, num_steps=2)
    family = ModelFamily("x", lcm=MemberSource(local_path=base, lcm_lora=AdapterSource()))
    with pytest.raises(ConfigError, match=r"model\.lcm\.lcm_lora needs a hub_id or a local_path"):
        family.member("lcm")


def test_an_lcm_lora_on_the_diffusion_member_is_refused(lora_family) -> None:
    family = ModelFamily("x", diffusion=lora_family.lcm)
    with pytest.raises(ConfigError, match=r"model\.diffusion\.lcm_lora is set"):
        build_ddim_policy(family, num_steps=2)


def test_an_lcm_lora_of_another_architecture_is_refused(tiny_family, tmp_path) -> None:
    """An SD 1.5 LCM-LoRA (768-wide text states) on an SDXL-like base, here the tiny base (32-wide)."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    save_file({key: torch.zeros(4, 768)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    family = ModelFamily(
        "x",
        lcm=MemberSource(
            local_path=tiny_family.diffusion.local_path, lcm_lora=AdapterSource(local_path=str(tmp_path))
        ),
    )
    with pytest.raises(ConfigError, match=r"768-wide text states \(SD 1\.5\).*takes 32"):
        family.member("lcm")


def test_a_sampler_without_its_member_is_refused(lora_family) -> None:
    with pytest.raises(ConfigError, match=r"no lcm member.*sampler=lcm"):
        build_lcm_policy(ModelFamily("base_only", diffusion=lora_family.diffusion), num_steps=2)


# ------------------------------------------------------------------ SDXL


@pytest.fixture(scope="module")
def sdxl_family(tiny_cache: str) -> ModelFamily:
    return tiny_sdxl_family(tiny_cache)


def make_policy(family: ModelFamily, sampler: str, guidance: float) -> Policy:
    if sampler == "lcm":
        return build_lcm_policy(family, num_steps=4, guidance_scale=guidance)
    return build_ddim_policy(family, num_steps=4, guidance_scale=guidance)


def sdxl_reference(family: ModelFamily, sampler: str, policy, prompts, seed: int, **kwargs):  # noqa: ANN001, ANN201
    """StableDiffusionXLPipeline on the same folder: DDIM with eta 1, or LCM sampling (the SDXL
    pipeline with an LCMScheduler and a guidance-embedded UNet, as LCM-SDXL is run)."""
    member = family.lcm if sampler == "lcm" else family.diffusion
    assert member is not None and member.local_path is not None
    pipe: Any = StableDiffusionXLPipeline.from_pretrained(member.local_path, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    steps = (
        dict(num_inference_steps=None, timesteps=policy.timesteps.tolist())
        if sampler == "lcm"
        else dict(num_inference_steps=policy.num_steps, eta=1.0)
    )
    return pipe(
        prompts,
        guidance_scale=policy.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        height=32,
        width=32,
        **steps,
        **kwargs,
    )


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 5.0), ("ddim", 1.0), ("lcm", 8.0), ("lcm", 1.5)])
def test_sdxl_images_and_transitions_equal_the_sdxl_pipeline(sdxl_family, sampler, guidance) -> None:
    policy = make_policy(sdxl_family, sampler, guidance)
    assert policy.resolution == 32  # from the folder (SDXL proper: 128 x 8 = 1024)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(4))
    images = sdxl_reference(sdxl_family, sampler, policy, PROMPTS, 4, output_type="pt").images
    torch.testing.assert_close(traj.images, images, atol=1e-5, rtol=0)
    seen: list[torch.Tensor] = []

    def record(pipe, i, t, kwargs):  # noqa: ANN001, ANN202 (diffusers' callback signature)
        seen.append(kwargs["latents"].clone())
        return {}

    sdxl_reference(
        sdxl_family, sampler, policy, PROMPTS, 4, output_type="latent", callback_on_step_end=record
    )
    for k in range(policy.num_transitions):
        torch.testing.assert_close(traj.next_latents[:, k], seen[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize(("sampler", "guidance"), [("ddim", 5.0), ("ddim", 1.0), ("lcm", 8.0), ("lcm", 1.0)])
def test_sdxl_first_ratio_is_one_and_the_added_conditioning_is_passed(sdxl_family, sampler, guidance) -> None:
    policy = make_policy(sdxl_family, sampler, guidance)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    x, t, kwargs = policy.denoiser_inputs(traj.latents[:, 0], 0, traj.conditioning, training=True)
    added = kwargs["added_cond_kwargs"]
    assert added["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * x.shape[0]
    assert added["text_embeds"].shape == (x.shape[0], 32) and kwargs["encoder_hidden_states"].shape[-1] == 64
    steps = torch.arange(policy.num_transitions).repeat(len(PROMPTS))
    rows = torch.arange(len(PROMPTS)).repeat_interleave(policy.num_transitions)
    new = policy.log_prob(
        traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
    )
    assert (torch.exp(new - traj.log_probs[rows, steps]) - 1).abs().max().item() <= 1e-5


def test_an_sd15_lcm_lora_on_an_sdxl_base_is_refused(sdxl_family, lora_family) -> None:
    assert lora_family.lcm is not None and sdxl_family.diffusion is not None
    wrong = MemberSource(local_path=sdxl_family.diffusion.local_path, lcm_lora=lora_family.lcm.lcm_lora)
    with pytest.raises(ConfigError, match=r"32-wide text states.*takes 64.*latent-consistency/lcm-lora-sdxl"):
        build_lcm_policy(ModelFamily("x", lcm=wrong), num_steps=2)


# ------------------------------------------------------------------ command line and export


@pytest.fixture(scope="module")
def lora_run(tiny_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("lcm_lora_run") / "run"
    overrides = [
        "model=tiny_sd15_lcm_lora",
        "task=compression",
        "train.epochs=2",
        "sampler.guidance_scale=1.5",
    ]
    # through the command line: the export's model card reads what Hydra wrote (.hydra/), which an
    # in-process run does not write
    subprocess.run([sys.executable, "-m", "rlcm_exp", *overrides, f"hydra.run.dir={run}"], check=True)
    return run


@pytest.mark.subprocess
def test_export_round_trip_reproduces_the_trained_policy(lora_run: Path, lora_family, tmp_path) -> None:
    from rlcm_exp.evaluation.export import export

    lora_dir = export(lora_run, "lora", tmp_path / "lora")
    pipe_dir = export(lora_run, "pipeline", tmp_path / "pipeline")
    assert "lcm_lora" in (lora_dir / "README.md").read_text()

    policy = build_lcm_policy(lora_family, num_steps=8, guidance_scale=1.5)
    load_lora(policy, lora_dir)  # as `sample` and `evaluate` load a run's LoRA
    expected = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(1)).images

    kwargs = dict(
        num_inference_steps=None,
        timesteps=policy.timesteps.tolist(),
        guidance_scale=1.5,
        output_type="pt",
        height=32,
        width=32,
    )
    fused: Any = DiffusionPipeline.from_pretrained(pipe_dir)
    assert type(fused).__name__ == "StableDiffusionPipeline"
    assert type(fused.scheduler).__name__ == "LCMScheduler"
    images = fused(PROMPTS[:2], generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    ref: Any = lcm_lora_reference(lora_family)  # base + LCM-LoRA fused (and unloaded), RL LoRA on top
    ref.unload_lora_weights()
    ref.load_lora_weights(str(lora_dir))
    images = ref(PROMPTS[:2], generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    # the model card's other recipe: both adapters active, unfused (equal up to float rounding)
    ref = StableDiffusionPipeline.from_pretrained(lora_family.diffusion.local_path, safety_checker=None)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(lora_family.lcm.lcm_lora.local_path, adapter_name="lcm")
    ref.load_lora_weights(str(lora_dir), adapter_name="rl")
    ref.set_adapters(["lcm", "rl"])
    images = ref(PROMPTS[:2], generator=torch.Generator().manual_seed(1), **kwargs).images
    torch.testing.assert_close(images, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def sdxl_run(tiny_cache: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sdxl_run") / "run"
    overrides = ["model=tiny_sdxl", "task=compression", "train.epochs=2"]
    subprocess.run([sys.executable, "-m", "rlcm_exp", *overrides, f"hydra.run.dir={run}"], check=True)
    return run


@pytest.mark.subprocess
def test_sdxl_export_round_trip_reproduces_the_trained_policy(sdxl_run: Path, sdxl_family, tmp_path) -> None:
    from rlcm_exp.evaluation.export import export

    lora_dir = export(sdxl_run, "lora", tmp_path / "lora")
    pipe_dir = export(sdxl_run, "pipeline", tmp_path / "pipeline")
    policy = build_lcm_policy(sdxl_family, num_steps=8, guidance_scale=8.0)
    load_lora(policy, lora_dir)
    expected = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(1)).images

    fused: Any = DiffusionPipeline.from_pretrained(pipe_dir, add_watermarker=False)
    assert type(fused).__name__ == "StableDiffusionXLPipeline"
    steps = dict(num_inference_steps=None, timesteps=policy.timesteps.tolist(), guidance_scale=8.0)
    images = fused(
        PROMPTS[:2],
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
        height=32,
        width=32,
        **steps,
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)

    assert sdxl_family.lcm is not None and sdxl_family.lcm.local_path is not None
    ref: Any = StableDiffusionXLPipeline.from_pretrained(sdxl_family.lcm.local_path, add_watermarker=False)
    ref.load_lora_weights(str(lora_dir))
    images = ref(
        PROMPTS[:2],
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
        height=32,
        width=32,
        **steps,
    ).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny_sd15_lcm_lora", "tiny_sdxl"])
def test_ddpo_runs_on_each_new_tiny_family(tiny_cache: str, tmp_path: Path, model: str) -> None:
    """The RLCM runs are the export fixtures above; DDPO (DDIM, CFG 5) on the same families here: its
    sampler, guidance and loss at their defaults, 4 DDIM steps instead of 50 and one held-out seed
    (the length of the chain and of the evaluation change no code path)."""
    overrides = [
        *("algo=ddpo", f"model={model}", "task=compression", "train.epochs=2"),
        *("sampler.num_steps=4", "train.eval_seeds=1"),
    ]
    run_in_process(overrides, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["ratio_first"] == pytest.approx(1.0, abs=1e-5)


def test_an_rl_lora_beyond_attention_saves_and_loads_whole(tiny_family, tmp_path: Path) -> None:
    """diffusers' format converter renames attention layers only; with proj_in too the file mixed two
    key formats and `load_lora_weights` silently dropped its attention part. Now it loads whole."""
    from safetensors.torch import load_file

    from rlcm_exp.models.lora import attach_lora, load_lora_into, save_lora

    def pipe() -> Any:
        return StableDiffusionPipeline.from_pretrained(tiny_family.diffusion.local_path, safety_checker=None)

    trained = pipe()
    attach_lora(trained.unet, 4, 8, "gaussian", ["to_q", "proj_in"])
    for name, param in trained.unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    save_lora(trained.unet, tmp_path / "lora")
    exported, resumed = pipe(), pipe()
    exported.load_lora_weights(str(tmp_path / "lora"))
    attach_lora(resumed.unet, 4, 8, "gaussian", ["to_q", "proj_in"])
    load_lora_into(resumed.unet, load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors")))
    x, states = torch.randn(1, 4, 16, 16), torch.randn(1, 16, 32)
    want = trained.unet(x, 500, encoder_hidden_states=states).sample
    for other in (exported, resumed):
        torch.testing.assert_close(other.unet(x, 500, encoder_hidden_states=states).sample, want)

"""The toy flow pair (model=toy_flow): rectified-flow formulas by hand, the quality table's two samplers,
the committed weights loaded through the family, the family's refusals, and the recipe's tiny schedule."""

from __future__ import annotations

import json

import pytest
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import ModelFamily
from rlcm_exp.models.hub import MemberSource
from rlcm_exp.toy import DIFFUSION_DIR, FLOW_WEIGHTS_DIR, data
from rlcm_exp.toy.build import build_unet, guidance_embedding
from rlcm_exp.toy.detector import detector_score
from rlcm_exp.toy.family import toy_flow_family
from rlcm_exp.toy.flow import (
    consistency_grid,
    eps_from_velocity,
    euler_step,
    flow_scheduler,
    guided,
    interpolate,
    student_sample,
    teacher_sample,
    x0_from_velocity,
)
from rlcm_exp.toy.flow_scoring import FlowMember, flow_acceptance
from rlcm_exp.toy.flow_stages import CD_GRID


def test_rectified_flow_formulas_by_hand() -> None:
    # x0 = 2, eps = -1, s = 0.25: x_s = 0.75 * 2 + 0.25 * (-1) = 1.25; the exact velocity eps - x0 = -3
    x0, eps = torch.tensor([[2.0]]), torch.tensor([[-1.0]])
    x_s = interpolate(x0, eps, 0.25)
    v = eps - x0
    assert x_s.item() == 1.25
    assert x0_from_velocity(x_s, 0.25, v).item() == 2.0  # 1.25 - 0.25 * (-3)
    assert eps_from_velocity(x_s, 0.25, v).item() == -1.0  # 1.25 + 0.75 * (-3)
    assert euler_step(x_s, 0.25, 0.0, v).item() == 2.0  # along the straight path, one step lands on x0
    assert guided(torch.tensor(3.0), torch.tensor(1.0), 2.5).item() == 6.0  # 1 + 2.5 * (3 - 1)
    # per-sample s broadcast over (B, C, H, W)
    s = torch.tensor([0.0, 1.0])
    x = interpolate(torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), s)
    assert torch.equal(x[0], torch.ones(1, 2, 2)) and torch.equal(x[1], torch.zeros(1, 2, 2))


def test_scheduler_euler_step_is_the_formula() -> None:
    scheduler = flow_scheduler()
    scheduler.set_timesteps(4)
    sigmas = scheduler.sigmas.tolist()
    assert scheduler.timesteps[0].item() == 1000.0 and sigmas[-1] == 0.0  # t = 1000 s, ends at s = 0
    gen = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for k, t in enumerate(scheduler.timesteps):
        ours = euler_step(x, sigmas[k], sigmas[k + 1], v)
        theirs = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_consistency_grid_lies_on_the_distillation_grid() -> None:
    assert consistency_grid(1) == [1.0] and consistency_grid(4) == [1.0, 0.75, 0.5, 0.25]
    for steps in (1, 2, 3, 4, 8):
        assert all(abs(s * CD_GRID - round(s * CD_GRID)) < 1e-9 for s in consistency_grid(steps))


def test_student_sampler_renoises_x0_hat_and_ends_deterministic() -> None:
    torch.manual_seed(0)
    unet = build_unet(time_cond_proj_dim=64).eval()
    cond = torch.randn(2, 16, 64)
    w = guidance_embedding(torch.full((2,), 3.0))
    noise = torch.randn(2, 4, 8, 8)
    got = student_sample(unet, cond, w, noise, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():  # by hand: s = 1, re-noise to s = 0.5 with fresh noise, x0_hat there
        x0 = noise - unet(noise, torch.full((2,), 1000.0), cond, timestep_cond=w).sample
        x = 0.5 * x0 + 0.5 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
        x0 = x - 0.5 * unet(x, torch.full((2,), 500.0), cond, timestep_cond=w).sample
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-6)


def test_committed_flow_pair_loads_and_the_student_samples_in_two_steps() -> None:
    family = toy_flow_family()
    assert family.process == "rectified_flow"
    assert family.member("diffusion").resolution == 32 and family.member("lcm").resolution == 32
    pipe = family.load("lcm")
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.unet.dtype == torch.float32 and pipe.unet.config.time_cond_proj_dim is not None
    prompts = data.heldout_prompts()[:4]
    images = FlowMember(pipe, few_step=True).sample(prompts, seed=0, steps=2, guidance=3.0)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
    assert detector_score(images, prompts).shape == (4,)
    teacher = json.loads((FLOW_WEIGHTS_DIR / "teacher" / "scheduler" / "scheduler_config.json").read_text())
    assert teacher["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_flow_and_vp_members_refuse_each_others_slots_before_loading() -> None:
    student_only = ModelFamily(name="x", lcm=toy_flow_family().lcm, process="rectified_flow")
    with pytest.raises(ConfigError, match=r"model=x has no diffusion member .*sampler=flow_sde or cps needs"):
        student_only.member("diffusion")
    vp_in_flow = ModelFamily(
        name="x", diffusion=MemberSource(local_path=str(DIFFUSION_DIR)), process="rectified_flow"
    )
    with pytest.raises(ConfigError, match=r"model.diffusion .* is a VP diffusion model .*DDIMScheduler"):
        vp_in_flow.member("diffusion")
    flow_in_vp = ModelFamily(name="x", lcm=MemberSource(local_path=str(FLOW_WEIGHTS_DIR / "student")))
    with pytest.raises(ConfigError, match=r"model.lcm .* is a rectified-flow model .*rectified_flow family"):
        flow_in_vp.member("lcm")


def test_flow_acceptance_needs_a_margin_on_each_split() -> None:
    scores = {
        "train": {"student4": 0.80, "teacher4_best": 0.74},
        "heldout": {"student4": 0.80, "teacher4_best": 0.76},
    }
    assert flow_acceptance(scores) == {
        "student4-teacher4_best>=0.05_train": True,
        "student4-teacher4_best>=0.05_heldout": False,
    }


@pytest.mark.slow
def test_tiny_flow_recipe_saves_loadable_members(tmp_path) -> None:  # noqa: ANN001
    from rlcm_exp.toy.flow_runner import FLOW_RECIPE_VERSION, run_flow
    from rlcm_exp.toy.runner import RecipeOptions

    record = run_flow(tmp_path, RecipeOptions(seed=0, schedule="tiny", threads=1))
    assert record["recipe_version"] == FLOW_RECIPE_VERSION and "quality" in record["wall_clock_s"]
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert set(quality["scores"]) == {"train", "heldout"} and "student4" in quality["scores"]["train"]
    family = toy_flow_family(str(tmp_path))
    for kind in ("diffusion", "lcm"):
        assert type(family.load(kind).scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


def test_flow_policies_drive_the_toy_pair_as_its_own_samplers_do() -> None:
    """The RL flow samplers over the toy pair's UNets (issue 28): the teacher under sampler=flow_sde with
    noise level 0 is the scheduler's Euler sampler with CFG (teacher_sample), the student under
    sampler=flow_consistency the multistep consistency sampler (student_sample, same draws)."""
    from rlcm_exp.policies.flow import build_flow_policy

    family, prompts = toy_flow_family(), data.heldout_prompts()[:3]
    teacher = build_flow_policy(family, "flow_sde", num_steps=5, guidance_scale=3.0, noise_level=0.0)
    student = build_flow_policy(family, "flow_consistency", num_steps=4, guidance_scale=5.0)
    states = teacher.encode_prompts(prompts).field("states")
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = teacher_sample(
        teacher.denoiser,
        states,
        teacher.encode_prompts([""]).field("states").expand(3, -1, -1),
        noise,
        5,
        3.0,
    )
    got = teacher.sample(prompts, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got.final_latents, want, rtol=0, atol=1e-5)
    w = guidance_embedding(torch.full((3,), 4.0))
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    want = student_sample(student.denoiser, states, w, noise, 4, gen)
    got = student.sample(prompts, torch.Generator().manual_seed(1))
    assert got.latents.shape[1] == 3  # three re-noised transitions, the last step deterministic
    torch.testing.assert_close(got.final_latents, want, rtol=0, atol=1e-5)

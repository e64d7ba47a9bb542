"""The LCM sampler as a policy against diffusers' LCMScheduler and LatentConsistencyModelPipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies.lcm import build_lcm_policy, guidance_embedding, lcm_denoise, lcm_timesteps

PROMPTS = ["a red cat", "a blue dog", "a green bird"]


def test_timesteps_follow_the_paper() -> None:
    assert lcm_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]
    assert lcm_timesteps(4).tolist() == [999, 759, 519, 279]
    assert lcm_timesteps(2).tolist() == [999, 499]
    assert lcm_timesteps(16).tolist() == list(range(999, 98, -60))
    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(8)
    assert lcm_timesteps(8, schedule="linspace").tolist() == sched.timesteps.tolist()


def test_policy_std_for_eight_steps(tiny_family) -> None:
    std = build_lcm_policy(tiny_family, num_steps=8).action_std()
    assert len(std) == 7
    assert std[0].item() == pytest.approx(0.991, abs=1e-3) and std[-1].item() == pytest.approx(
        0.430, abs=1e-3
    )


@pytest.mark.parametrize("num_steps", [2, 4, 8])
def test_transitions_equal_lcm_scheduler_step(tiny_family, num_steps: int) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=num_steps)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_family.lcm.local_path)
    sched = pipe.scheduler
    sched.set_timesteps(timesteps=policy.timesteps.tolist())
    x = torch.randn(2, 4, 16, 16)
    for k, t in enumerate(sched.timesteps):
        eps = torch.randn_like(x)
        g = torch.Generator().manual_seed(k)
        prev, denoised = sched.step(eps, t, x, generator=g, return_dict=False)
        c = policy._consts(torch.full((2,), k), x.device)
        ours_denoised = lcm_denoise(eps, x, c[0], c[1], c[2], c[3])
        # At t=999 the denoised estimate divides by sqrt(abar) ~ 0.07, so its entries reach ~100,
        # where one fp32 ulp is already 7.6e-6: atol 1e-5 plus rtol 1e-6 (~8 ulps) is the fp32 limit.
        torch.testing.assert_close(ours_denoised, denoised, atol=1e-5, rtol=1e-6)
        if k < num_steps - 1:
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k))
            torch.testing.assert_close(c[4] * ours_denoised + c[5] * z, prev, atol=1e-5, rtol=1e-6)
        x = prev


def test_guidance_embedding_matches_pipeline(tiny_family) -> None:
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_family.lcm.local_path)
    w = torch.tensor([7.0, 0.5, 3.0])
    torch.testing.assert_close(
        guidance_embedding(w, 32), pipe.get_guidance_scale_embedding(w, embedding_dim=32)
    )


@pytest.mark.parametrize(("num_steps", "guidance"), [(2, 8.0), (4, 8.0), (8, 1.5)])
def test_images_equal_the_pipeline_for_the_same_seed(tiny_family, num_steps: int, guidance: float) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=num_steps, guidance_scale=guidance)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(3))
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_family.lcm.local_path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
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
    assert traj.latents.shape == (3, num_steps - 1, 4, 16, 16) and traj.log_probs.shape == (3, num_steps - 1)


def test_log_probs_are_the_closed_form_density_and_recompute_exactly(tiny_family) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=4)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    w_emb = policy._w_embedding(3, torch.float32)
    for k in range(policy.num_transitions):
        t = policy.timesteps[k]
        eps = policy.denoiser(
            traj.latents[:, k],
            t,
            encoder_hidden_states=traj.conditioning.field("states"),
            timestep_cond=w_emb,
        ).sample
        sched = LCMScheduler.from_config(policy_scheduler_config(tiny_family))
        sched.set_timesteps(timesteps=policy.timesteps.tolist())
        sched._step_index = k
        _, denoised = sched.step(eps, t, traj.latents[:, k], return_dict=False)
        abar_next = sched.alphas_cumprod[policy.timesteps[k + 1]]
        dist = torch.distributions.Normal(abar_next.sqrt() * denoised, (1 - abar_next).sqrt())
        expected = dist.log_prob(traj.next_latents[:, k]).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, k], expected, atol=1e-5, rtol=0)
    # recompute on a shuffled mix of (sample, step) pairs, as a training minibatch does
    rows = torch.tensor([2, 0, 1, 1, 0, 2])
    steps = torch.tensor([0, 2, 1, 0, 1, 2])
    new = policy.log_prob(
        traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
    )
    ratio = torch.exp(new - traj.log_probs[rows, steps])
    assert (ratio - 1).abs().max().item() <= 1e-5


def policy_scheduler_config(family) -> dict:
    return LatentConsistencyModelPipeline.from_pretrained(family.lcm.local_path).scheduler.config


def test_noisy_final_step_trains_every_step(tiny_family) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=4, noisy_final_step=True)
    traj = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    assert policy.num_transitions == 4 and traj.log_probs.shape == (2, 4)
    # the extra transition re-uses t_H for its noise level, as diffusers' step does with no next timestep
    abar = LatentConsistencyModelPipeline.from_pretrained(tiny_family.lcm.local_path).scheduler.alphas_cumprod
    torch.testing.assert_close(policy.action_std()[-1], (1 - abar[policy.timesteps[-1]]).sqrt())


def test_one_step_is_refused_with_the_key(tiny_family) -> None:
    with pytest.raises(ConfigError, match=r"sampler\.num_steps=1"):
        build_lcm_policy(tiny_family, num_steps=1)

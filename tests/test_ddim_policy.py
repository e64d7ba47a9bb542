"""DDIMPolicy against diffusers: the transition, whole images, log-probs, and refused settings."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from rlcm_exp.errors import ConfigError
from rlcm_exp.models import tiny_family
from rlcm_exp.policies import _sd
from rlcm_exp.policies.ddim import DDIMPolicy, build_ddim_policy, ddim_coefficients, ddim_mean

PROMPTS = ["a red cat", "a blue circle on a green background", "a dog"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def pipe(family):
    return family.load("diffusion")


def make_policy(pipe, **overrides) -> DDIMPolicy:
    kwargs = dict(num_steps=4, eta=1.0, guidance_scale=5.0, train_cfg=True, resolution=32)
    kwargs.update(overrides)
    return DDIMPolicy(_sd.pipeline_modules(pipe), **kwargs)


def reference_pipeline(pipe) -> StableDiffusionPipeline:
    """The same modules in a fresh SD pipeline, so its scheduler state is its own."""
    return StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_timesteps_and_std(pipe):
    policy = make_policy(pipe, num_steps=50)
    assert policy.timesteps.tolist() == list(range(981, 0, -20))
    assert policy.num_transitions == 50
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    expected = torch.stack([sched._get_variance(int(t), int(t) - 20).sqrt() for t in policy.timesteps])
    # diffusers forms 1 - abar_t / abar_prev in float32: ~1e-5 relative cancellation error at t=1
    torch.testing.assert_close(policy.action_std(), expected.float(), atol=1e-6, rtol=2e-5)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_transition_matches_ddim_scheduler(pipe, eta, num_steps):
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)
    coefs = ddim_coefficients(sched.alphas_cumprod, sched.timesteps, sched.final_alpha_cumprod, eta)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for k, t in enumerate(sched.timesteps):  # includes the last step, whose t_prev < 0
        eps, x_t, noise = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
        expected = sched.step(eps, t, x_t, eta=eta, variance_noise=noise).prev_sample
        mean = ddim_mean(
            eps,
            x_t,
            coefs.sqrt_abar[k],
            coefs.sqrt_one_minus_abar[k],
            coefs.sqrt_abar_prev[k],
            coefs.direction[k],
        )
        got = mean + coefs.sigma[k] * noise
        worst = max(worst, (got - expected).abs().max().item())
    assert int(sched.timesteps[-1]) - 1000 // num_steps < 0
    print(f"transition max |ours - DDIMScheduler.step| (eta={eta}, N={num_steps}): {worst:.3e}")
    assert worst < 1e-5


@pytest.mark.parametrize(("guidance_scale", "num_steps"), [(5.0, 4), (1.0, 4), (5.0, 10), (1.0, 10)])
def test_images_match_stable_diffusion_pipeline(pipe, guidance_scale, num_steps):
    policy = make_policy(pipe, num_steps=num_steps, guidance_scale=guidance_scale)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(7))
    expected = reference_pipeline(pipe)(
        PROMPTS,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
        height=32,
        width=32,
    ).images
    assert traj.images.dtype == torch.float32 and traj.images.shape == (3, 3, 32, 32)
    dev = (traj.images - expected).abs().max().item()
    print(f"image max |policy - pipeline| (g={guidance_scale}, N={num_steps}): {dev:.3e}")
    assert dev < 1e-5
    # the trajectory is one chain: each state is the previous action
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1], rtol=0, atol=0)
    side = 32 // policy.vae_scale
    assert traj.latents.shape == (3, num_steps, 4, side, side) and traj.log_probs.shape == (3, num_steps)


def hand_eps(pipe, x, t, prompts, guidance_scale):
    """eps from the pipeline's own prompt encoding and guidance formula."""
    cfg = guidance_scale > 1
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, cfg)
    if not cfg:
        return pipe.unet(x, t, encoder_hidden_states=cond).sample
    out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_log_probs_closed_form_and_recomputed(pipe, guidance_scale):
    num_steps, eta = 6, 1.0
    policy = make_policy(pipe, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(3))
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(num_steps)

    # 1. recorded log-probs = the Gaussian density of the recorded action, built by hand from diffusers
    worst_hand = 0.0
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            x, x_next = traj.latents[:, k], traj.next_latents[:, k]
            eps = hand_eps(pipe, x, t, PROMPTS, guidance_scale)
            mean = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
            std = eta * sched._get_variance(int(t), int(t) - 1000 // num_steps).sqrt()
            lp = torch.distributions.Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
            worst_hand = max(worst_hand, (lp - traj.log_probs[:, k]).abs().max().item())
    print(f"recorded vs hand-computed log-prob (g={guidance_scale}): {worst_hand:.3e}")
    assert worst_hand < 1e-5

    # 2. recomputed on a shuffled mix of (sample, step) pairs, in minibatches of mixed timesteps
    pairs = [(b, k) for b in range(len(PROMPTS)) for k in range(num_steps)]
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
    worst_ratio = 0.0
    for start in range(0, len(order), 4):
        chunk = [pairs[i] for i in order[start : start + 4]]
        b = torch.tensor([p[0] for p in chunk])
        k = torch.tensor([p[1] for p in chunk])
        new = policy.log_prob(traj.latents[b, k], traj.next_latents[b, k], k, traj.conditioning[b])
        assert new.shape == (len(chunk),) and new.dtype == torch.float32
        assert len(set(k.tolist())) > 1 or len(chunk) == 1  # minibatches do mix timesteps
        old = traj.log_probs[b, k]
        assert (new - old).abs().max().item() < 1e-5
        worst_ratio = max(worst_ratio, (torch.exp(new - old) - 1).abs().max().item())
    print(f"max |ratio - 1| on the shuffled mix (g={guidance_scale}): {worst_ratio:.3e}")
    assert worst_ratio < 1e-5


def test_log_prob_without_train_cfg_uses_the_conditional_eps(pipe):
    policy = make_policy(pipe, num_steps=4, guidance_scale=5.0, train_cfg=False)
    traj = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(1))
    k = torch.tensor([0, 2])
    b = torch.tensor([0, 1])
    new = policy.log_prob(traj.latents[b, k], traj.next_latents[b, k], k, traj.conditioning[b])
    assert (new - traj.log_probs[b, k]).abs().max() > 1e-4  # guided sampling, unguided density
    conditional = make_policy(pipe, num_steps=4, guidance_scale=1.0)
    ref = conditional.log_prob(traj.latents[b, k], traj.next_latents[b, k], k, traj.conditioning[b])
    torch.testing.assert_close(new, ref)


def test_log_prob_has_grad_through_lora(family):
    from rlcm_exp.models import attach_lora

    policy = build_ddim_policy(family, num_steps=3)
    params = attach_lora(policy.denoiser, 2, 2.0, "gaussian", ["to_q", "to_k", "to_v", "to_out.0"])
    traj = policy.sample(PROMPTS[:2], torch.Generator().manual_seed(0))
    k = torch.tensor([2, 0])
    b = torch.tensor([0, 1])
    new = policy.log_prob(traj.latents[b, k], traj.next_latents[b, k], k, traj.conditioning[b])
    assert new.requires_grad
    torch.testing.assert_close(new, traj.log_probs[b, k], atol=1e-5, rtol=0)
    new.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_refuses_eta_zero(pipe):
    with pytest.raises(ConfigError, match="sampler.eta"):
        make_policy(pipe, eta=0.0)


def test_refuses_eta_above_one_when_undefined(pipe):
    with pytest.raises(ConfigError, match="sampler.eta"):
        make_policy(pipe, eta=3.0, num_steps=50)


@pytest.mark.parametrize(
    ("override", "name"),
    [
        ({"clip_sample": True}, "clip_sample"),
        ({"thresholding": True}, "thresholding"),
        ({"prediction_type": "v_prediction"}, "prediction_type"),
    ],
)
def test_refuses_unsupported_scheduler_settings(pipe, override, name):
    bad = DDIMScheduler.from_config(pipe.scheduler.config, **override)
    with pytest.raises(ConfigError, match=name):
        DDIMPolicy(
            dataclasses.replace(_sd.pipeline_modules(pipe), scheduler=bad),
            num_steps=4,
            eta=1.0,
            guidance_scale=5.0,
            train_cfg=True,
            resolution=32,
        )

"""The declared policy interface: both policies satisfy it, `unet_inputs` is exactly what sampling
and training feed the UNet, one resolution check, the sampler -> member map; and the DDIM policy's
last step under both `set_alpha_to_one` settings, against the formula of DDPO (ddpo-pytorch's
ddim_step_with_logprob) and trl."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from omegaconf import OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies import _sd
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.ddim import DDIMPolicy, build_ddim_policy
from rlcm_exp.policies.lcm import LCMPolicy, build_lcm_policy
from rlcm_exp.policies.members import sampler_member

PROMPTS = ["a red cat", "a blue dog"]


class Recorder:
    """Every UNet call's (x, t, kwargs), recorded by a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        x, t = args[0], args[1]
        self.calls.append(
            (x.detach().clone(), t.detach().clone(), {k: v.detach().clone() for k, v in kwargs.items()})
        )

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def assert_same_inputs(recorded: tuple, expected: tuple) -> None:
    (x, t, kw), (ex, et, ekw) = recorded, expected
    assert torch.equal(x, ex) and torch.equal(t, et)
    assert set(kw) == set(ekw)
    for key, value in kw.items():
        assert torch.equal(value, ekw[key]), key


def make_ddim(tiny_family, **overrides) -> DDIMPolicy:
    kwargs: dict[str, Any] = dict(num_steps=4, guidance_scale=5.0, train_cfg=True)
    kwargs.update(overrides)
    return build_ddim_policy(tiny_family, **kwargs)


@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_both_policies_satisfy_the_protocol(tiny_family, kind) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=4) if kind == "lcm" else make_ddim(tiny_family)
    assert isinstance(policy, Policy)
    assert policy.member == ("lcm" if kind == "lcm" else "diffusion")
    assert policy.timesteps.shape == (policy.num_steps,)
    # the estimates: one per step, the last one decodes to `sample`'s images
    estimates = list(policy.estimates(PROMPTS, torch.Generator().manual_seed(1)))
    assert len(estimates) == policy.num_steps
    images = policy.sample(PROMPTS, torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(policy.decode(estimates[-1]), images, rtol=0, atol=0)


def test_a_non_policy_is_not_a_policy() -> None:
    assert not isinstance(object(), Policy)


def test_lcm_unet_inputs_are_what_sample_and_log_prob_call(tiny_family) -> None:
    policy = build_lcm_policy(tiny_family, num_steps=4)
    with Recorder(policy.denoiser) as rec:
        traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    # H calls: one per trained transition, then the deterministic final call at the last state
    states = [traj.latents[:, k] for k in range(policy.num_transitions)] + [traj.next_latents[:, -1]]
    assert len(rec.calls) == policy.num_steps == len(states)
    for k, (call, state) in enumerate(zip(rec.calls, states, strict=True)):
        assert_same_inputs(call, policy.denoiser_inputs(state, k, traj.conditioning, training=False))
        assert "timestep_cond" in call[2] and call[0].shape[0] == len(PROMPTS)  # no batch doubling

    rows, steps = torch.tensor([1, 0, 1]), torch.tensor([0, 2, 1])
    args = (traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows])
    with Recorder(policy.denoiser) as rec:
        policy.log_prob(*args)
    assert len(rec.calls) == 1
    expected = policy.denoiser_inputs(
        traj.latents[rows, steps], steps, traj.conditioning[rows], training=True
    )
    assert_same_inputs(rec.calls[0], expected)


@pytest.mark.parametrize(
    ("guidance_scale", "train_cfg", "doubled_sampling", "doubled_training"),
    [(5.0, True, True, True), (5.0, False, True, False), (1.0, True, False, False)],
)
def test_ddim_unet_inputs_are_what_sample_and_log_prob_call(
    tiny_family, guidance_scale, train_cfg, doubled_sampling, doubled_training
) -> None:
    policy = make_ddim(tiny_family, guidance_scale=guidance_scale, train_cfg=train_cfg)
    batch = len(PROMPTS)
    with Recorder(policy.denoiser) as rec:
        traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert len(rec.calls) == policy.num_steps
    for k, call in enumerate(rec.calls):
        assert_same_inputs(
            call, policy.denoiser_inputs(traj.latents[:, k], k, traj.conditioning, training=False)
        )
        assert call[0].shape[0] == (2 * batch if doubled_sampling else batch)

    rows, steps = torch.tensor([1, 0]), torch.tensor([3, 1])
    with Recorder(policy.denoiser) as rec:
        policy.log_prob(
            traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
        )
    expected = policy.denoiser_inputs(
        traj.latents[rows, steps], steps, traj.conditioning[rows], training=True
    )
    assert len(rec.calls) == 1
    assert_same_inputs(rec.calls[0], expected)
    assert rec.calls[0][0].shape[0] == (4 if doubled_training else 2)


@pytest.mark.parametrize("kind", ["lcm", "ddim"])
def test_one_resolution_check_for_both_policies(tiny_family, kind) -> None:
    build = build_lcm_policy if kind == "lcm" else build_ddim_policy
    with pytest.raises(ConfigError, match=r"sampler\.resolution=33"):
        build(tiny_family, num_steps=2, resolution=33)
    policy = build(tiny_family, num_steps=2, resolution=48)  # another multiple of the VAE factor is fine
    assert policy.sample(PROMPTS[:1], torch.Generator().manual_seed(0)).images.shape == (1, 3, 48, 48)


def test_check_resolution_names_the_key() -> None:
    _sd.check_resolution(64, 8)
    for bad in (60, 0, -8):
        with pytest.raises(ConfigError, match=f"sampler.resolution={bad}"):
            _sd.check_resolution(bad, 8)


def test_sampler_member_reads_the_builder_without_loading() -> None:
    lcm = OmegaConf.create({"_target_": "rlcm_exp.policies.lcm.build_lcm_policy", "num_steps": 4})
    ddim = OmegaConf.create({"_target_": "rlcm_exp.policies.ddim.build_ddim_policy"})
    assert sampler_member(lcm) == LCMPolicy.member == "lcm"
    assert sampler_member(ddim) == DDIMPolicy.member == "diffusion"
    with pytest.raises(ConfigError, match="sampler._target_"):
        sampler_member(OmegaConf.create({"_target_": "rlcm_exp.errors.find_config_error"}))
    with pytest.raises(ConfigError, match="sampler._target_"):
        sampler_member(OmegaConf.create({"_target_": "no_such_module.builder"}))


# ----------------------------------------------------------------------------- DDIM past the last timestep


def ddpo_log_prob(
    sched: DDIMScheduler, eps: torch.Tensor, t: int, x: torch.Tensor, x_prev: torch.Tensor, eta: float
) -> torch.Tensor:
    """The DDPO / trl transition density, written from their formula: the previous timestep is
    clamped to 0 (so past the end abar_prev = alphas_cumprod[0]), then DDIM eq. 12 and 16 in float32."""
    num_train = sched.config.num_train_timesteps
    t_prev = min(max(t - num_train // sched.num_inference_steps, 0), num_train - 1)
    abar_t, abar_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev]
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    std = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    mean = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
    lp = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=(1, 2, 3))


def guided_eps(policy: DDIMPolicy, x: torch.Tensor, k: int, embeds: torch.Tensor) -> torch.Tensor:
    x_in, t, kwargs = policy.denoiser_inputs(x, k, embeds, training=False)
    eps_u, eps_c = policy.denoiser(x_in, t, **kwargs).sample.chunk(2)
    return eps_u + policy.guidance_scale * (eps_c - eps_u)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_last_step_matches_ddpo_for_both_scheduler_settings(tiny_family, set_alpha_to_one) -> None:
    pipe = tiny_family.load("diffusion")
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=set_alpha_to_one)
    modules = dataclasses.replace(_sd.pipeline_modules(pipe), scheduler=scheduler)
    policy = DDIMPolicy(modules, num_steps=4, eta=1.0, guidance_scale=5.0, train_cfg=True, resolution=32)
    assert bool((policy.action_std() > 0).all())  # the last step too: diffusers' rule gives 0 with True

    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(2))
    assert torch.isfinite(traj.log_probs).all() and torch.isfinite(traj.images).all()
    # the first PPO ratio is 1 at every step, the last included
    steps = torch.arange(policy.num_steps).repeat(len(PROMPTS))
    rows = torch.arange(len(PROMPTS)).repeat_interleave(policy.num_steps)
    new = policy.log_prob(
        traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
    )
    assert (torch.exp(new - traj.log_probs[rows, steps]) - 1).abs().max().item() < 1e-5

    # the recorded log-probs are DDPO's for the same actions
    sched = DDIMScheduler.from_config(scheduler.config)
    sched.set_timesteps(policy.num_steps)
    with torch.no_grad():
        for k, t in enumerate(policy.timesteps.tolist()):
            x, x_prev = traj.latents[:, k], traj.next_latents[:, k]
            expected = ddpo_log_prob(sched, guided_eps(policy, x, k, traj.conditioning), t, x, x_prev, 1.0)
            torch.testing.assert_close(traj.log_probs[:, k], expected, atol=1e-5, rtol=0)

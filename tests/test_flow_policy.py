"""The rectified-flow policy (policies/flow.py) on the tiny SD3.5 and FLUX.1 families: images equal
diffusers' StableDiffusion3Pipeline / FluxPipeline with stochasticity off, the first importance
ratio is 1 for every (family, sampler) pair with guidance on and off, the training window, and the
one-line errors that come before any weights load."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import ModelFamily, tiny_flux1_family, tiny_sd35_family
from rlcm_exp.policies.base import Policy
from rlcm_exp.policies.flow import (
    FlowPolicy,
    build_flow_policy,
)

PROMPTS = ["a red cat", "a blue dog on a green background"]
# conf/sampler/<kind>.yaml's defaults, as the CLI composes them
DEFAULTS = {
    "flow_sde": {"num_steps": 10, "guidance_scale": 4.5, "noise_level": 0.7},
    "cps": {"num_steps": 10, "guidance_scale": 4.5, "eta": 0.7},
    "flow_consistency": {"num_steps": 4, "guidance_scale": 1.0},
}


def build(kind: str, family: ModelFamily, **options: Any) -> FlowPolicy:
    """`build_flow_policy` for sampler `kind` with its config's defaults, `options` overriding them."""
    return build_flow_policy(family, kind, **{**DEFAULTS[kind], **options})


@pytest.fixture(scope="module")
def families(tiny_cache: str) -> dict[str, ModelFamily]:
    return {"tiny_sd35": tiny_sd35_family(tiny_cache), "tiny_flux1": tiny_flux1_family(tiny_cache)}


def reference_images(
    family: ModelFamily, member: str, policy: FlowPolicy, guidance: float, seed: int
) -> torch.Tensor:
    """The stock diffusers pipeline of the member, loaded on its own, same prompts and seed."""
    source = family.member(member)
    assert source.local_path is not None
    cls: Any = FluxPipeline if family.name == "tiny_flux1" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(source.local_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS,
        num_inference_steps=policy.num_steps,
        guidance_scale=guidance,
        height=policy.resolution,
        width=policy.resolution,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


@pytest.mark.parametrize(
    ("family_name", "member", "guidance"),
    [
        ("tiny_sd35", "diffusion", 1.0),
        ("tiny_sd35", "diffusion", 4.5),  # classifier-free guidance, batch doubled
        ("tiny_sd35", "lcm", 1.0),
        ("tiny_flux1", "diffusion", 3.5),  # FLUX.1-dev's guidance embedding
        ("tiny_flux1", "lcm", 1.0),  # FLUX.1-schnell: no guidance
    ],
)
def test_without_noise_images_equal_the_diffusers_pipeline(families, family_name, member, guidance) -> None:
    family = families[family_name]
    pipe = family.load(member)
    policy = FlowPolicy(pipe, "cps", member, num_steps=4, guidance_scale=guidance, resolution=32, eta=0.0)
    assert policy.num_transitions == 0  # eta 0: every step is the Euler step
    images = policy.sample(PROMPTS, torch.Generator().manual_seed(3)).images
    expected = reference_images(family, member, policy, guidance, seed=3)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    # the Flow-SDE with noise level 0 is the same sampler
    sde = FlowPolicy(
        pipe, "flow_sde", member, num_steps=4, guidance_scale=guidance, resolution=32, noise_level=0.0
    )
    torch.testing.assert_close(
        sde.sample(PROMPTS, torch.Generator().manual_seed(3)).images, images, atol=1e-6, rtol=0
    )


PAIRS = [
    ("tiny_sd35", "flow_sde", 1.0),
    ("tiny_sd35", "flow_sde", 4.5),
    ("tiny_sd35", "cps", 1.0),
    ("tiny_sd35", "cps", 4.5),
    ("tiny_sd35", "flow_consistency", 1.0),
    ("tiny_sd35", "flow_consistency", 2.0),
    ("tiny_flux1", "flow_sde", 1.0),
    ("tiny_flux1", "flow_sde", 3.5),
    ("tiny_flux1", "cps", 1.0),
    ("tiny_flux1", "cps", 3.5),
    ("tiny_flux1", "flow_consistency", 1.0),  # schnell has no guidance to switch on (see the errors)
]


@pytest.mark.parametrize(("family_name", "sampler", "guidance"), PAIRS)
def test_first_ratio_is_one(families, family_name, sampler, guidance) -> None:
    policy = build(sampler, families[family_name], num_steps=3, guidance_scale=guidance)
    assert isinstance(policy, Policy)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(0))
    t = policy.num_transitions
    assert t == (3 if sampler == "flow_sde" else 2)  # cps and re-noise: the last step is deterministic
    steps, rows = torch.arange(t).repeat(len(PROMPTS)), torch.arange(len(PROMPTS)).repeat_interleave(t)
    new = policy.log_prob(
        traj.latents[rows, steps], traj.next_latents[rows, steps], steps, traj.conditioning[rows]
    )
    assert (torch.exp(new - traj.log_probs[rows, steps]) - 1).abs().max().item() <= 1e-5
    torch.testing.assert_close(policy.decode(traj.final_latents), traj.images, atol=0, rtol=0)


def test_estimates_end_on_the_sampled_image(families) -> None:
    policy = build("flow_consistency", families["tiny_sd35"], num_steps=3)
    estimates = list(policy.estimates(PROMPTS, torch.Generator().manual_seed(1)))
    assert len(estimates) == 3
    images = policy.sample(PROMPTS, torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(policy.decode(estimates[-1]), images, atol=0, rtol=0)


def test_the_training_window_records_only_the_chosen_steps(families) -> None:
    """sampler.stochastic_steps=[1]: one trained transition, from the state before step 1; the other
    steps are Euler, so the rollout draws x_1 and one normal only."""
    policy = build("flow_sde", families["tiny_flux1"], num_steps=4, guidance_scale=1.0, stochastic_steps=[1])
    assert policy.num_transitions == 1 and policy.action_std().shape == (1,)
    traj = policy.sample(PROMPTS, torch.Generator().manual_seed(2))
    assert traj.latents.shape[1] == 1
    new = policy.log_prob(
        traj.latents[:, 0], traj.next_latents[:, 0], torch.zeros(2, dtype=torch.long), traj.conditioning
    )
    assert (torch.exp(new - traj.log_probs[:, 0]) - 1).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------- errors before loading

# each class of issue 28's one-line errors: the CLI's overrides and the line, raised by the CLI's own
# config check (validation.check_before_loading) before any weights load
BEFORE_LOADING = {
    "flow sampler on a VP family": (
        ["model=tiny", "algo=grpo", "sampler=flow_sde"],
        r"sampler=flow_sde samples rectified flow, but model=tiny is VP",
    ),
    "VP sampler on a flow family": (
        ["model=tiny_sd35", "sampler=lcm"],
        r"sampler=lcm samples VP .* model=tiny_sd35 is rectified flow",
    ),
    "DDIM on a flow family": (["model=sd35_medium", "sampler=ddim", "~paper"], r"sampler=ddim samples VP"),
    "few-step sampler without a few-step member": (
        ["model=sd35_medium", "sampler=flow_consistency"],
        r"model=sd35_medium has no lcm member .* sampler=flow_consistency needs",
    ),
    "guidance the member does not support": (
        ["model=tiny_flux1", "sampler=flow_consistency", "sampler.guidance_scale=3.5"],
        r"sampler\.guidance_scale=3\.5: the lcm member .* no guidance embedding",
    ),
    "resolution the patching cannot divide": (
        ["model=tiny_flux1", "algo=grpo", "sampler=flow_sde", "sampler.resolution=34"],
        r"sampler\.resolution=34: .* 2x2 patches need a multiple of 4; use e\.g\. 32",
    ),
    "resolution the VAE cannot divide": (
        ["model=tiny_sd35", "algo=grpo", "sampler=flow_sde", "sampler.resolution=33"],
        r"sampler\.resolution=33 is not a positive multiple of the VAE's factor 2",
    ),
    "stochastic step outside the schedule": (
        [
            "model=tiny_sd35",
            "algo=grpo",
            "sampler=flow_sde",
            "sampler.num_steps=4",
            "sampler.stochastic_steps=[4]",
        ],
        r"sampler\.stochastic_steps=\[4\]",
    ),
    "stochastic step on the deterministic last step": (
        [
            "model=tiny_flux1",
            "sampler=flow_consistency",
            "sampler.num_steps=4",
            "sampler.stochastic_steps=[3]",
        ],
        r"sampler\.stochastic_steps=\[3\].*from \[0, 1, 2\]",
    ),
}


@pytest.mark.parametrize("case", list(BEFORE_LOADING))
def test_the_clis_config_check_refuses_before_any_model_loads(tiny_cache, monkeypatch, case: str) -> None:
    from rlcm_exp.configs import compose
    from rlcm_exp.models import hub
    from rlcm_exp.validation import check_before_loading

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model loaded")

    monkeypatch.setattr(hub, "load_pipeline", no_loading)
    monkeypatch.setattr(ModelFamily, "load", no_loading)
    overrides, message = BEFORE_LOADING[case]
    with pytest.raises(ConfigError, match=message) as err:
        check_before_loading(compose(overrides=[*overrides, "task=compression"]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny_sd35", "algo=grpo", "sampler=flow_sde", "sampler.stochastic_steps=[0,9]"],
        ["model=tiny_flux1", "sampler=flow_consistency", "sampler.resolution=32"],
        ["model=tiny_flux1", "algo=grpo", "sampler=cps", "~paper", "sampler.guidance_scale=3.5"],
        ["model=sd35_large", "sampler=flow_consistency"],
        ["model=tiny"],
    ],
)
def test_the_clis_config_check_passes_what_fits(tiny_cache, overrides: list[str]) -> None:
    from rlcm_exp.configs import compose
    from rlcm_exp.validation import check_before_loading

    check_before_loading(compose(overrides=[*overrides, "task=compression"]))

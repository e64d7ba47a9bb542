"""The rectified-flow step tables (policies/flow_steps.py): the schedule against diffusers'
FlowMatchEulerDiscreteScheduler, each stochastic step's mean and std against a hand-worked evaluation
of its paper's formula, the noise-free step against the scheduler's `step`, the training window
(sampler.stochastic_steps), and the closed-form check of ../shared/flow-models.md: Gaussian data
N(m, c^2), its exact rectified-flow velocity, sampled with each stochastic sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies.flow_steps import (
    estimates,
    flow_sigmas,
    resolution_mu,
    step_mean,
    step_table,
)

GRID = torch.tensor([1.0, 0.5, 0.0])  # two steps: s = 1 -> 0.5 -> 0


# ----------------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_sd3_static_shift_matches_the_scheduler(shift: float, num_steps: int) -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    torch.testing.assert_close(flow_sigmas(num_steps, shift=shift), sched.sigmas, atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_steps", [1, 4, 28])
@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096])
def test_flux_resolution_shift_matches_the_scheduler(num_steps: int, image_seq_len: int) -> None:
    """FluxPipeline: sigmas = linspace(1, 1/N, N), mu = calculate_shift(image tokens)."""
    mu = resolution_mu(image_seq_len)  # diffusers' calculate_shift: 0.5 at 256 tokens, 1.15 at 4096
    assert mu == pytest.approx(0.5 + (image_seq_len - 256) * 0.65 / 3840, abs=1e-12)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    base = np.linspace(1.0, 1 / num_steps, num_steps)
    sched.set_timesteps(num_steps, sigmas=base, mu=mu)
    got = flow_sigmas(num_steps, mu=mu, base=torch.from_numpy(base))
    torch.testing.assert_close(got, sched.sigmas, atol=1e-6, rtol=0)


# ------------------------------------------------------------------- hand-worked tables (GRID)


def test_flow_sde_table_by_hand() -> None:
    """Flow-GRPO eq. 9, noise level a = 0.7. Step 0 (s=1, s'=0.5, dt=-0.5): 1/(1-s) taken at the next
    grid value 0.5, sigma_s = 0.7 sqrt(1/0.5) = 0.98995, std = sigma_s sqrt(0.5) = 0.7,
    b = s' + sigma_s^2 dt / (2 s) = 0.5 - 0.98 * 0.5 / 2 = 0.255. Step 1 (s=0.5, s'=0): sigma_s = 0.7,
    std = 0.7 sqrt(0.5) = 0.494975, b = 0 - 0.49 * 0.5 / 1 = -0.245, a = 1."""
    table = step_table("flow_sde", GRID, noise_level=0.7)
    torch.testing.assert_close(table.a, torch.tensor([0.5, 1.0]), atol=1e-7, rtol=0)
    torch.testing.assert_close(table.b, torch.tensor([0.255, -0.245]), atol=1e-7, rtol=0)
    torch.testing.assert_close(table.std, torch.tensor([0.7, 0.7 * math.sqrt(0.5)]), atol=1e-7, rtol=0)
    assert table.trained_steps.tolist() == [0, 1]


def test_cps_and_renoise_tables_by_hand() -> None:
    """CPS eta = 0.5 (angle pi/4), step 0: a = 0.5, b = std = 0.5 / sqrt 2; the last step lands on
    s' = 0, std 0: deterministic (the image is x0_hat). The re-noise: a = 0.5, b = 0, std = 0.5."""
    cps = step_table("cps", GRID, eta=0.5)
    torch.testing.assert_close(cps.a, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(cps.b, torch.tensor([0.5 / math.sqrt(2), 0.0]))
    torch.testing.assert_close(cps.std, torch.tensor([0.5 / math.sqrt(2), 0.0]))
    cm = step_table("flow_consistency", GRID)
    assert cm.a.tolist() == [0.5, 1.0] and cm.b.tolist() == [0.0, 0.0] and cm.std.tolist() == [0.5, 0.0]
    assert cps.trained_steps.tolist() == cm.trained_steps.tolist() == [0]


def paper_flow_sde(x, v, s, s_next, s1, a):  # noqa: ANN001, ANN201 (the paper's symbols)
    """Flow-GRPO's SDE step as its eq. 9 and the public code write it: mean in (x, v)."""
    dt = s_next - s
    sigma = a * math.sqrt(s / (1 - (s1 if s == 1 else s)))
    mean = x * (1 + sigma**2 / (2 * s) * dt) + v * (1 + sigma**2 * (1 - s) / (2 * s)) * dt
    return mean, sigma * math.sqrt(-dt)


def paper_cps(x, v, s, s_next, eta):  # noqa: ANN001, ANN201
    """CPS as its paper and its authors' code write it: x0 and x1 (noise) estimates."""
    std = s_next * math.sin(eta * math.pi / 2)
    x0, x1 = x - s * v, x + (1 - s) * v
    return x0 * (1 - s_next) + x1 * math.sqrt(s_next**2 - std**2), std


@pytest.mark.parametrize("kind", ["flow_sde", "cps", "flow_consistency"])
def test_every_stochastic_step_is_its_paper_formula(kind: str) -> None:
    sigmas = flow_sigmas(6, shift=3.0)
    table = step_table(kind, sigmas, noise_level=0.7, eta=0.6)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for k in table.trained_steps.tolist():
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        if kind == "flow_sde":
            mean, std = paper_flow_sde(x.double(), v.double(), s, s_next, float(sigmas[1]), 0.7)
        else:
            mean, std = paper_cps(x.double(), v.double(), s, s_next, 0.6 if kind == "cps" else 1.0)
        got = step_mean(x, v, sigmas[k], table.a[k], table.b[k])
        torch.testing.assert_close(got.double(), mean, atol=1e-6, rtol=0)
        assert abs(float(table.std[k]) - std) < 1e-6


@pytest.mark.parametrize(("kind", "options"), [("flow_sde", {"noise_level": 0.0}), ("cps", {"eta": 0.0})])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_without_noise_every_step_is_the_schedulers_euler_step(
    kind: str, options: dict, shift: float
) -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(5)
    table = step_table(kind, flow_sigmas(5, shift=shift), **options)
    assert not bool(table.stochastic.any())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for k, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        expected = sched.step(v, t, x, return_dict=False)[0]
        x = step_mean(x, v, table.sigmas[k], table.a[k], table.b[k])
        torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------- the training window


def test_stochastic_steps_choose_the_trained_steps() -> None:
    sigmas = flow_sigmas(6)
    table = step_table("flow_sde", sigmas, stochastic_steps=[3, 1])
    assert table.trained_steps.tolist() == [1, 3]
    euler = step_table("flow_sde", sigmas, noise_level=0.0)
    for k in (0, 2, 4, 5):  # the others are the deterministic Euler step
        assert table.std[k] == 0 and table.a[k] == euler.a[k] and table.b[k] == euler.b[k]


@pytest.mark.parametrize(
    ("kind", "steps"), [("flow_sde", [6]), ("flow_sde", [-1]), ("cps", [5]), ("flow_consistency", [])]
)
def test_stochastic_steps_outside_the_schedule_are_one_line(kind: str, steps: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"sampler\.stochastic_steps=.*outside the schedule") as err:
        step_table(kind, flow_sigmas(6), stochastic_steps=steps)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------- the closed-form check

M, C = 0.3, 0.5  # data x0 ~ N(M, C^2) per element


def marginal_var(s: torch.Tensor) -> torch.Tensor:
    """Var x_s for x_s = (1 - s) x0 + s eps."""
    return (1 - s) ** 2 * C**2 + s**2


def exact_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_s = x] for Gaussian data: the ideal flow-matching network."""
    d = x - (1 - s) * M
    x0_hat = M + (1 - s) * C**2 / marginal_var(s) * d
    eps_hat = s / marginal_var(s) * d
    return eps_hat - x0_hat


def exact_consistency_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The velocity whose x0 estimate x - s v is the flow ODE's end point (an ideal consistency model):
    for Gaussian data the ODE maps x_s affinely, x0 = M + C (x - (1 - s) M) / sqrt(Var x_s)."""
    x0 = M + C * (x - (1 - s) * M) / marginal_var(s).sqrt()
    return (x - x0) / s


def sample_and_propagate(table, velocity, n: int = 60_000):  # noqa: ANN001, ANN201
    """Samples through the table (the policy's step: mean + std z) and, alongside, the exact mean and
    variance of x (every step is affine in x for Gaussian data, so they propagate in closed form)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for k in range(len(table.a)):
        s, a, b, std = (t[k].double() for t in (table.sigmas, table.a, table.b, table.std))
        x = step_mean(x, velocity(x, s), s, a, b) + std * torch.randn(n, generator=g, dtype=torch.float64)
        # the step is x' = slope x + offset + std z: push the mean and variance through it
        offset = step_mean(torch.zeros(()), velocity(torch.zeros((), dtype=torch.float64), s), s, a, b)
        slope = step_mean(torch.ones(()), velocity(torch.ones((), dtype=torch.float64), s), s, a, b) - offset
        mean, var = slope * mean + offset, slope**2 * var + std**2
    return x, float(mean), math.sqrt(float(var))


def assert_lands_on(x: torch.Tensor, mean: float, std: float) -> None:
    """Sample mean and std within 4.5 standard errors of (mean, std)."""
    n = len(x)
    assert abs(float(x.mean()) - mean) < 4.5 * std / math.sqrt(n)
    assert abs(float(x.std()) - std) < 4.5 * std / math.sqrt(2 * n)


def test_flow_sde_lands_on_the_data_distribution() -> None:
    """Flow-SDE keeps the ODE's marginals in the limit of small steps: at 100 steps the sampled
    distribution is N(M, C^2) within Monte-Carlo error (the first step's s=1 rule leaves ~1e-3)."""
    table = step_table("flow_sde", flow_sigmas(80), noise_level=0.7)
    x, mean, std = sample_and_propagate(table, exact_velocity)
    assert_lands_on(x, mean, std)  # the sampler is the affine Gaussian chain it claims to be
    assert_lands_on(x, M, C)


@pytest.mark.parametrize("num_steps", [2, 4])
def test_consistency_renoise_lands_on_the_data_distribution(num_steps: int) -> None:
    """With the exact consistency function (the ODE's end point) the re-noise step is exact at any
    step count: x0_hat ~ N(M, C^2) re-noised with fresh noise is the marginal at s'."""
    table = step_table("flow_consistency", flow_sigmas(num_steps, shift=3.0))
    x, mean, std = sample_and_propagate(table, exact_consistency_velocity)
    assert abs(mean - M) < 1e-6 and abs(std - C) < 1e-6  # the table is float32
    assert_lands_on(x, M, C)


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_cps_is_the_closed_form_chain_but_under_disperses_with_the_exact_velocity(eta: float) -> None:
    """CPS replaces a fixed fraction sin(eta pi/2) of the noise at every step, so with the exact
    (posterior-mean) velocity it does NOT keep N(M, C^2): its mean lands, its std stays below C, even
    at 50 steps (eta 0.3: ~0.47, eta 0.7: ~0.41). ../shared/flow-models.md says CPS preserves the
    marginals; it preserves the coefficients of x0_hat and noise, which is not the same thing here.
    What is checked: the samples are the closed-form chain, and the mean lands."""
    table = step_table("cps", flow_sigmas(50), eta=eta)
    x, mean, std = sample_and_propagate(table, exact_velocity)
    assert_lands_on(x, mean, std)
    assert abs(mean - M) < 1e-6
    assert std < C - 0.01


def test_estimates_are_the_flow_identities() -> None:
    x0, eps, s = torch.randn(5), torch.randn(5), torch.tensor(0.3)
    x0_hat, eps_hat = estimates((1 - s) * x0 + s * eps, eps - x0, s)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("steps", [3, "0", [0.5], [True]])
def test_stochastic_steps_that_are_not_a_list_of_ints_are_one_line(steps) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"sampler\.stochastic_steps=.*give a non-empty list"):
        step_table("flow_sde", flow_sigmas(4), stochastic_steps=steps)

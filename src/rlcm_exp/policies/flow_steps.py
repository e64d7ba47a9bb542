"""Rectified-flow samplers as one Gaussian step over (x0_hat, eps_hat): the schedule and the tables.

Rectified flow (SD3, FLUX; diffusers' FlowMatchEulerDiscreteScheduler): x_s = (1 - s) x0 + s eps,
s in [0, 1], s = 1 pure noise. One call of the network at (x_s, s) predicts a velocity v ~ eps - x0,
from which
    x0_hat = x_s - s v,        eps_hat = x_s + (1 - s) v.
Every sampler here takes step k from s = s_k to s' = s_{k+1} < s as
    x_{s'} ~ N(a_k x0_hat + b_k eps_hat, std_k^2 I)
with per-step scalars fixed by the schedule and the sampler (../shared/flow-models.md):

- Euler (the ODE; every deterministic step): a = 1 - s', b = s', std = 0, i.e. x_s + (s' - s) v.
- Flow-SDE (Flow-GRPO, arXiv 2505.05470, eq. 9 with dt = s' - s < 0, noise level a):
  sigma_s = a sqrt(s / (1 - s)); mean = x_s + [v + sigma_s^2 / (2 s) (x_s + (1 - s) v)] dt;
  std = sigma_s sqrt(-dt). Since x_s + v dt is the Euler step and x_s + (1 - s) v = eps_hat:
  a_k = 1 - s', b_k = s' + sigma_s^2 dt / (2 s). At s = 1 the public implementations (flow_grpo
  and its ports) evaluate 1 / (1 - s) at the grid's next value s_1 (only there).
- CPS (Coefficients-Preserving Sampling, arXiv 2509.05952, eta): a = 1 - s',
  b = s' cos(eta pi / 2), std = s' sin(eta pi / 2).
- Consistency re-noise (the LCM multistep step written for rectified flow): a = 1 - s', b = 0,
  std = s' (CPS at eta = 1): the x0 estimate re-noised with fresh noise.

A step whose s' = 0 has std 0 for CPS and the re-noise: it is deterministic (the image is x0_hat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlcm_exp.errors import ConfigError


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's static timestep shift: s -> shift s / (1 + (shift - 1) s) (1 stays 1, 0 stays 0)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """FLUX's resolution-dependent ("exponential") shift: s -> e^mu / (e^mu + (1 / s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's mu: linear in the number of image tokens, base_shift at base_seq_len and max_shift at
    max_seq_len (diffusers' `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flow_sigmas(
    num_steps: int,
    shift: float = 1.0,
    mu: float | None = None,
    base: torch.Tensor | None = None,
    num_train: int = 1000,
) -> torch.Tensor:
    """(H + 1,) float32 grid s_0 > ... > s_{H-1} > s_H = 0, as FlowMatchEulerDiscreteScheduler's
    `set_timesteps(num_steps, sigmas=base, mu=mu)` makes it. `base` None: the scheduler's own grid,
    linspace from its largest to its smallest training sigma (those statically shifted unless
    dynamic shifting is on, as the scheduler's constructor does). Then the shift: `time_shift(mu)`
    when `mu` is given (dynamic shifting), else `shift_sigmas(shift)`."""
    if base is None:
        train = torch.arange(num_train, 0, -1, dtype=torch.float32) / num_train
        if mu is None:
            train = shift_sigmas(train, shift)
        # linspace in timestep units (sigma * num_train), in float64 as numpy does, then back
        hi, lo = float(train[0]) * num_train, float(train[-1]) * num_train
        base = torch.linspace(hi, lo, num_steps, dtype=torch.float64).float() / num_train
    base = torch.as_tensor(base, dtype=torch.float32)
    sigmas = time_shift(base.double(), mu).float() if mu is not None else shift_sigmas(base, shift)
    return torch.cat([sigmas.float(), torch.zeros(1)])


@dataclass(frozen=True)
class StepTable:
    """The per-step Gaussian of a rollout: x_{s_{k+1}} ~ N(a_k x0_hat + b_k eps_hat, std_k^2 I).
    All (H,) float32 but `sigmas`, (H + 1,); `stochastic[k]` says whether step k is a trained
    transition (std_k > 0) or a deterministic Euler step (std_k = 0)."""

    sigmas: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    std: torch.Tensor

    @property
    def stochastic(self) -> torch.Tensor:
        return self.std > 0

    @property
    def trained_steps(self) -> torch.Tensor:
        """(T,) long: the step index of each trained transition, in rollout order."""
        return self.stochastic.nonzero().flatten()

    def stacked(self) -> torch.Tensor:
        """(4, H): s_k, a_k, b_k, std_k, one tensor to move to a device once and gather from."""
        return torch.stack([self.sigmas[:-1], self.a, self.b, self.std])


def flow_sde_coefficients(sigmas: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, ...]:
    """(a, b, std) of Flow-GRPO's SDE step at every step of the grid, in float64."""
    s, s_next = sigmas[:-1].double(), sigmas[1:].double()
    dt = s_next - s
    # at s = 1 the public implementations put the grid's next value in 1 / (1 - s), nowhere else
    s_denominator = torch.where(s == 1, s_next[0], s)
    sigma_s = noise_level * torch.sqrt(s / (1 - s_denominator))
    return 1 - s_next, s_next + sigma_s**2 * dt / (2 * s), sigma_s * torch.sqrt(-dt)


def cps_coefficients(sigmas: torch.Tensor, eta: float) -> tuple[torch.Tensor, ...]:
    """(a, b, std) of coefficients-preserving sampling at every step of the grid, in float64."""
    s_next = sigmas[1:].double()
    angle = eta * math.pi / 2
    return 1 - s_next, s_next * math.cos(angle), s_next * math.sin(angle)


def renoise_coefficients(sigmas: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(a, b, std) of the consistency re-noise step (CPS at eta = 1, b exactly 0)."""
    s_next = sigmas[1:].double()
    return 1 - s_next, torch.zeros_like(s_next), s_next.clone()


def check_stochastic_steps(steps: list[int] | None, stochastic: torch.Tensor, sampler: str) -> torch.Tensor:
    """(H,) bool mask of the trained steps: `steps` (sampler.stochastic_steps, 0-based step indices)
    or, when None, every step the sampler can make stochastic. Refuses, in one line, a step outside
    the schedule or one the sampler keeps deterministic (std 0: s' = 0 for cps and the re-noise)."""
    num_steps = len(stochastic)
    if steps is None:
        return stochastic.clone()
    possible = stochastic.nonzero().flatten().tolist()
    listed = list(steps) if isinstance(steps, list | tuple) or hasattr(steps, "__len__") else None
    valid = listed is not None and all(isinstance(k, int) and not isinstance(k, bool) for k in listed)
    chosen = sorted({int(k) for k in listed}) if valid and listed is not None else []
    bad = [k for k in chosen if k not in possible]
    if bad or not chosen:
        raise ConfigError(
            f"sampler.stochastic_steps={listed if valid else steps} is outside the schedule of sampler={sampler} with "
            f"sampler.num_steps={num_steps}: give a non-empty list of 0-based step indices from {possible} "
            "(the steps this sampler can make stochastic), or null for all of them."
        )
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[chosen] = True
    return mask


def step_table(
    kind: str,
    sigmas: torch.Tensor,
    stochastic_steps: list[int] | None = None,
    noise_level: float = 0.7,
    eta: float = 1.0,
) -> StepTable:
    """The table of sampler `kind` ("flow_sde" | "cps" | "flow_consistency") on the grid `sigmas`
    (H + 1,): the chosen stochastic steps with the sampler's coefficients, every other step Euler."""
    if kind == "flow_sde":
        a, b, std = flow_sde_coefficients(sigmas, noise_level)
    elif kind == "cps":
        a, b, std = cps_coefficients(sigmas, eta)
    elif kind == "flow_consistency":
        a, b, std = renoise_coefficients(sigmas)
    else:
        raise ConfigError(f"unknown flow sampler {kind!r}: one of ['flow_sde', 'cps', 'flow_consistency']")
    mask = check_stochastic_steps(stochastic_steps, std > 0, kind)
    s_next = sigmas[1:].double()
    a = torch.where(mask, a, 1 - s_next)  # a deterministic step is the Euler (ODE) step
    b = torch.where(mask, b, s_next)
    std = torch.where(mask, std, torch.zeros_like(std))
    return StepTable(sigmas.float(), a.float(), b.float(), std.float())


def estimates(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the state x_s and the velocity v at s (broadcastable)."""
    return x - s * v, x + (1 - s) * v


def step_mean(
    x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The Gaussian step's mean a x0_hat + b eps_hat, from the state and the velocity."""
    x0_hat, eps_hat = estimates(x, v, s)
    return a * x0_hat + b * eps_hat

"""DDIM sampling with eta > 0 as a Gaussian policy (the DDPO baseline, Black et al. 2023, sec. 4.2).

State s_k = (x_{t_k}, t_k, prompt) for the H scheduler timesteps t_1 > ... > t_H (steps_offset=1,
H=50: 981, 961, ..., 1). One (classifier-free guided) UNet call eps_theta at t_k gives the action
    x_{t_prev} ~ N( sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps_theta,  sigma_t^2 I ),
    x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta) / sqrt(abar_t),
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)),
with t_prev = t - num_train // H (DDIM eq. 12 and 16, as diffusers' DDIMScheduler.step computes it
without clipping). Past the end of the chain (the last step, t_prev < 0) abar_prev := abar_0 =
alphas_cumprod[0], as DDPO (ddpo-pytorch's ddim_step_with_logprob clamps t_prev to 0) and trl do.
diffusers uses the scheduler's final_alpha_cumprod there, which equals abar_0 when
set_alpha_to_one=False (SD's configs) but is 1 when it is True: then sigma of the last step is 0 and
its log-probability undefined. Only the mean depends on theta. Every step is stochastic, so all H transitions are trained; the image decodes the
last action x_{t_H prev} itself. eta = 0 is plain DDIM: deterministic, no density, not trainable.

Classifier-free guidance doubles the batch: eps = eps_u + g * (eps_c - eps_u) with eps_u the UNet's
prediction for the empty prompt. DDPO applies it both when sampling and when recomputing log-probs
(`train_cfg=True`), so the first PPO ratio is exactly 1. With `train_cfg=False` log_prob uses the
conditional prediction alone: half the UNet cost, but the recomputed mean is no longer the mean the
action was drawn from, so the first ratio is not 1 (unless guidance_scale <= 1, i.e. no guidance).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies import _sd
from rlcm_exp.policies.base import Generators
from rlcm_exp.policies.conditioning import Conditioning
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rl.gaussian import gaussian_log_prob


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-step constants of the DDIM transition, each (H,) float32, indexed by step k."""

    sqrt_abar: torch.Tensor  # sqrt(abar_t)
    sqrt_one_minus_abar: torch.Tensor  # sqrt(1 - abar_t)
    sqrt_abar_prev: torch.Tensor  # sqrt(abar_prev)
    direction: torch.Tensor  # sqrt(1 - abar_prev - sigma_t^2), the weight of eps in the mean
    sigma: torch.Tensor  # sigma_t, the policy's fixed std

    def stacked(self) -> torch.Tensor:
        """(5, H), in field order: one tensor to move to a device once and gather from."""
        return torch.stack(
            [self.sqrt_abar, self.sqrt_one_minus_abar, self.sqrt_abar_prev, self.direction, self.sigma]
        )


def ddim_coefficients(
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    final_alpha_cumprod: float | torch.Tensor | None,
    eta: float,
) -> DDIMCoefficients:
    """The schedule constants of every step, for a scheduler with num_train = len(alphas_cumprod).

    `final_alpha_cumprod` is abar_prev past the end of the chain: None means alphas_cumprod[0], the
    rule of DDPO and trl (what DDIMPolicy uses); a scheduler's `final_alpha_cumprod` gives diffusers'
    DDIMScheduler.step. Computed in float64 and rounded once to float32, so they agree with diffusers'
    float32 arithmetic to an ulp.
    """
    abar = alphas_cumprod.double()
    t = timesteps.long()
    # 1. t_prev = t - num_train // H: diffusers' rule for every timestep spacing (with "leading"
    #    spacing t_prev is exactly the next timestep; the last step has t_prev < 0)
    t_prev = t - len(abar) // len(t)
    # 2. abar_t, and abar_prev := final_alpha_cumprod (default abar_0) past the end of the chain
    abar_t = abar[t]
    final = abar[0] if final_alpha_cumprod is None else torch.as_tensor(final_alpha_cumprod, dtype=abar.dtype)
    abar_prev = torch.where(t_prev >= 0, abar[t_prev.clamp(min=0)], final)
    # 3. sigma_t = eta * sqrt(DDIM posterior variance)  (DDIM eq. 16)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    sigma = eta * variance.sqrt()
    # 4. weight of the "direction pointing to x_t": sqrt(1 - abar_prev - sigma_t^2)
    direction_sq = 1 - abar_prev - sigma**2
    if bool((direction_sq < 0).any()):  # eta > 1 can ask for more noise than the marginal has
        raise ConfigError(
            f"sampler.eta={eta}: the DDIM noise sigma_t exceeds sqrt(1 - abar_prev) at some step, so the "
            "update is undefined. Use 0 < sampler.eta <= 1 (DDPO uses 1.0)."
        )

    def f32(x: torch.Tensor) -> torch.Tensor:
        return x.float().contiguous()

    return DDIMCoefficients(
        sqrt_abar=f32(abar_t.sqrt()),
        sqrt_one_minus_abar=f32((1 - abar_t).sqrt()),
        sqrt_abar_prev=f32(abar_prev.sqrt()),
        direction=f32(direction_sq.sqrt()),
        sigma=f32(sigma),
    )


def ddim_mean(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    sqrt_abar_t: torch.Tensor,
    sqrt_one_minus_abar_t: torch.Tensor,
    sqrt_abar_prev: torch.Tensor,
    direction: torch.Tensor,
) -> torch.Tensor:
    """Mean of the DDIM action for an epsilon-predicting UNet; the action is mean + sigma_t * z."""
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)   (no clip_sample, no thresholding)
    x0_hat = (x_t - sqrt_one_minus_abar_t * eps) / sqrt_abar_t
    # 2. direction pointing to x_t: sqrt(1 - abar_prev - sigma_t^2) * eps
    to_x_t = direction * eps
    # 3. mean = sqrt(abar_prev) * x0_hat + direction  (the order diffusers adds them in)
    return sqrt_abar_prev * x0_hat + to_x_t


class DDIMPolicy(_sd.SDPolicy):
    """DDIM (eta > 0) sampling as a `rlcm_exp.policies.base.Policy` over the family's "diffusion" member.

    What does not depend on the sampler is `_sd.SDPolicy`'s; `modules` are `_sd.pipeline_modules(pipe)`."""

    member = "diffusion"  # the model family's member this policy drives

    def __init__(
        self,
        modules: _sd.PipelineModules,
        num_steps: int,
        eta: float,
        guidance_scale: float,
        train_cfg: bool,
        resolution: int,
    ) -> None:
        if not eta > 0:  # `not >` also refuses NaN
            raise ConfigError(
                f"sampler.eta={eta}: DDPO needs eta > 0. With eta=0 DDIM is deterministic, so a step has no "
                "log-probability to train by policy gradient. Use sampler.eta=1.0 (the DDPO default)."
            )
        if num_steps < 1:
            raise ConfigError(f"sampler.num_steps={num_steps}: DDIM needs at least one step (DDPO uses 50)")
        # A private DDIM scheduler built from the member's config: DDPO swaps whatever scheduler the
        # checkpoint ships (often PNDM) for DDIM the same way, and set_timesteps below must not
        # mutate a scheduler the pipeline still owns.
        sched = DDIMScheduler.from_config(modules.scheduler.config)
        _check_scheduler(sched.config, num_steps)
        self.scheduler = sched
        self.num_steps = num_steps
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.train_cfg = train_cfg
        self._init_pipeline(modules, resolution, guidance_scale)
        self.init_noise_sigma = float(sched.init_noise_sigma)

        sched.set_timesteps(num_steps)
        self.timesteps = sched.timesteps.detach().cpu().long().clone()
        # abar_prev past the end of the chain: alphas_cumprod[0] (DDPO, trl), not final_alpha_cumprod
        self._coefs = ddim_coefficients(sched.alphas_cumprod, self.timesteps, None, eta)
        if bool((self._coefs.sigma <= 0).any()):
            k = int((self._coefs.sigma <= 0).nonzero()[0])
            raise ConfigError(
                f"sampler.num_steps={num_steps}: DDIM step {k} (t={int(self.timesteps[k])}) has no noise "
                "(abar_prev = abar_t), so its log-probability is undefined. The diffusion member's scheduler "
                "needs steps_offset >= 1 (Stable Diffusion's configs have steps_offset=1)."
            )
        self._table = self._coefs.stacked()  # (5, H) float32, CPU

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance in sampling (the pipeline's rule: guidance_scale > 1)."""
        return self._cfg.enabled

    @property
    def num_transitions(self) -> int:
        return self.num_steps  # every DDIM step with eta > 0 is stochastic

    def action_std(self) -> torch.Tensor:
        """Std sigma_t of each trained transition, (T,)."""
        return self._coefs.sigma.clone()

    def _guided(self, training: bool) -> bool:
        """Whether this UNet call uses classifier-free guidance: when sampling, whenever the pipeline
        would (guidance_scale > 1); when recomputing log-probs, only with `train_cfg` too."""
        return self.use_cfg and (self.train_cfg or not training)

    def _consts(self, step_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(5, B, 1, 1, 1) schedule constants at per-sample steps, rows as DDIMCoefficients' fields:
        one gather on the device, no host round trip."""
        return self._on("table", self._table, device)[:, step_index.to(device)].view(5, -1, 1, 1, 1)

    def _rollout(self, cond: Conditioning, generator: Generators) -> Iterator[_sd.RolloutStep]:
        """The H steps of one rollout, lazily. Random draws follow StableDiffusionPipeline +
        DDIMScheduler.step(eta, generator): x_T first, then one latent-shaped normal per step, all
        from `generator` in the pipeline's dtype, so the same seed gives the pipeline's image. The
        state is kept in float32 whatever the model dtype, so the recorded actions are exact."""
        batch, device = len(cond), self.device
        shape, x = self._initial_state(cond, generator, self.init_noise_sigma)
        for k in range(self.num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction, sigma = self._consts(step, device)
            eps = self._eps(x, step, cond, training=False)
            mean = ddim_mean(eps, x, sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction)
            x_prev = mean + sigma * _sd.step_noise(shape, generator, device, cond.dtype)  # the action
            yield _sd.RolloutStep(x, x_prev, mean, sigma, (x - sqrt_1m_abar * eps) / sqrt_abar)
            x = x_prev

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: Generators) -> Trajectory:
        """Roll out H DDIM steps for a batch of prompts; records all H transitions. The image decodes
        the last action itself."""
        cond = self.encode_prompts(prompts)
        transitions = []
        for step in self._rollout(cond, generator):
            assert step.action is not None  # every DDIM step is stochastic
            transitions.append((step.x, step.action, gaussian_log_prob(step.action, step.mean, step.std)))
        final = transitions[-1][1]
        return Trajectory.from_steps(prompts, cond, transitions, final, self.decode(final))

    @torch.no_grad()
    def estimates(self, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
        """After each DDIM step, that step's predicted x0_hat; after the last step, the final sample
        itself (what `sample` decodes)."""
        cond = self.encode_prompts(prompts)
        for k, step in enumerate(self._rollout(cond, generator)):
            yield step.action if k == self.num_steps - 1 and step.action is not None else step.x0_estimate

    def action_mean_std(
        self, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian action's mean (the DDIM update, with grad, guided as `log_prob` is) and its
        fixed std eta * sigma_t (the KL to the base model compares two such means)."""
        step_index = step_index.to(device=latents.device, dtype=torch.long)
        sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction, sigma = self._consts(step_index, latents.device)
        eps = self._eps(latents, step_index, cond, training=True)
        return ddim_mean(eps, latents.float(), sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction), sigma


def _check_scheduler(cfg: Any, num_steps: int) -> None:
    """Refuse scheduler settings the policy's Gaussian transition does not model."""
    for key, bad in (("clip_sample", cfg.clip_sample), ("thresholding", cfg.thresholding)):
        if bad:
            raise ConfigError(
                f"the diffusion member's scheduler config has {key}=True: the DDIM policy's mean must be "
                f"smooth in eps, so {key} must be False (set {key}: false in its scheduler_config.json)"
            )
    if cfg.prediction_type != "epsilon":
        raise ConfigError(
            f"the diffusion member's scheduler config has prediction_type={cfg.prediction_type!r}: the DDIM "
            "policy supports an epsilon-predicting UNet only"
        )
    if num_steps > cfg.num_train_timesteps:
        raise ConfigError(
            f"sampler.num_steps={num_steps} exceeds the model's num_train_timesteps={cfg.num_train_timesteps}"
        )


def build_ddim_policy(
    family: Any,
    num_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    train_cfg: bool = True,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
) -> DDIMPolicy:
    """Load the family's diffusion member and wrap it as a DDIM policy. `resolution=None` uses the member's own."""
    return _sd.from_family(
        DDIMPolicy,
        family,
        device,
        resolution,
        num_steps=num_steps,
        eta=eta,
        guidance_scale=guidance_scale,
        train_cfg=train_cfg,
    )


# validation.check_sampler_fits_model runs the checks that need no weights against the model config
build_ddim_policy.check_family = lambda family, node: _sd.check_member_fits(  # type: ignore[attr-defined]
    DDIMPolicy.member, family, node.get("resolution")
)

"""Multistep latent-consistency sampling as a Gaussian policy (RLCM, arXiv 2404.03673, sec. 4).

State s_k = (x_{t_k}, t_k, prompt); one UNet call f_theta at t_k gives the action
    x_{t_{k+1}} ~ N( sqrt(abar_{t_{k+1}}) * denoised_theta(x_{t_k}, t_k),  (1 - abar_{t_{k+1}}) I ),
so only the mean depends on theta. The last call is deterministic (image = decode(denoised)), as in
diffusers and the paper: H steps give H-1 trained transitions. `noisy_final_step=True` reproduces
the reference code, which also noises the last step (with abar_{t_next} := abar_{t_H}) and trains
H transitions; that extra term has zero expected gradient, since the image decodes `denoised`.

Guidance: a guidance-distilled LCM (LCM-Dreamshaper, LCM-SDXL) takes w = guidance_scale - 1 as an
embedding (`timestep_cond`, the UNet's time_cond_proj_dim), with no batch doubling. A UNet without
that embedding (an LCM-LoRA fused into a base, e.g. lcm-lora-sdv1-5) is guided classifier-free by
batch doubling when guidance_scale > 1 (LCM-LoRA works at 1-2; 1 turns guidance off), exactly as
StableDiffusionPipeline with an LCMScheduler runs it; sampling and log-prob recomputation make the
same guided call, so the first PPO ratio stays 1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import LCMScheduler

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies import _sd
from rlcm_exp.policies.base import Generators
from rlcm_exp.policies.conditioning import Conditioning
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rl.gaussian import gaussian_log_prob

log = logging.getLogger(__name__)
# above this classifier-free scale an LCM-LoRA's images saturate (its authors recommend 1-2)
LORA_MAX_GUIDANCE = 2.0


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight w (B,), scaled by 1000 like a timestep (VDM/LCM)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def lcm_denoise(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    sqrt_abar_t: torch.Tensor,
    sqrt_one_minus_abar_t: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
) -> torch.Tensor:
    """The consistency function f_theta(x_t, t) for an epsilon-predicting UNet."""
    # 1. x0_hat = (x_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)
    x0_hat = (x_t - sqrt_one_minus_abar_t * eps) / sqrt_abar_t
    # 2. boundary condition: denoised = c_skip(t) * x_t + c_out(t) * x0_hat
    return c_skip * x_t + c_out * x0_hat


def lcm_timesteps(
    num_steps: int, original_steps: int = 50, num_train: int = 1000, schedule: str = "skip"
) -> torch.Tensor:
    """The H timesteps, taken from the distillation grid t = k * (num_train // original_steps) - 1.

    "skip" (paper and reference code): every (original_steps // H)-th grid point from 999 down,
    H=8: 999, 879, ..., 159; H=4: 999, 759, 519, 279. "linspace" (diffusers >= 0.25's
    LCMScheduler.set_timesteps): floor(linspace) indices, H=8: 999, 879, 759, 639, 499, ..., 139.
    """
    grid = (torch.arange(1, original_steps + 1) * (num_train // original_steps) - 1).flip(0)
    if num_steps > original_steps:
        raise ConfigError(
            f"sampler.num_steps={num_steps} exceeds the LCM's original_inference_steps={original_steps}"
        )
    if schedule == "skip":
        return grid[:: original_steps // num_steps][:num_steps].clone()
    if schedule == "linspace":
        idx = torch.linspace(0, original_steps, num_steps + 1)[:-1].floor().long()
        return grid[idx].clone()
    raise ConfigError(f"sampler.timestep_schedule={schedule!r} is not one of ['skip', 'linspace']")


def _guidance_embedding_dim(unet: Any, guidance_scale: float) -> int | None:
    """The UNet's guidance-embedding width (time_cond_proj_dim), None for an LCM-LoRA; warns when
    such a UNet is asked for more classifier-free guidance than LCM-LoRA is made for."""
    dim = getattr(unet.config, "time_cond_proj_dim", None)
    if dim is None and guidance_scale > LORA_MAX_GUIDANCE:
        log.warning(
            "sampler.guidance_scale=%s: the LCM member's UNet has no guidance embedding (an LCM-LoRA), so "
            "this is classifier-free guidance by batch doubling; LCM-LoRA is meant for 1-2 (1: off).",
            guidance_scale,
        )
    return None if dim is None else int(dim)


class LCMPolicy(_sd.SDPolicy):
    """Multistep LCM sampling as a `rlcm_exp.policies.base.Policy` over the family's "lcm" member.

    What does not depend on the sampler is `_sd.SDPolicy`'s; `modules` are `_sd.pipeline_modules(pipe)`."""

    member = "lcm"  # the model family's member this policy drives

    def __init__(
        self,
        modules: _sd.PipelineModules,
        num_steps: int,
        guidance_scale: float,
        noisy_final_step: bool,
        resolution: int,
        timestep_schedule: str = "skip",
    ) -> None:
        if num_steps < 2:
            raise ConfigError(
                f"sampler.num_steps={num_steps}: RLCM needs at least 2 steps. With one step the only UNet "
                "call is the deterministic final one, so there is no stochastic transition to train by policy "
                "gradient. Use sampler.num_steps=2 or more (the paper trains with 8)."
            )
        # a base's own scheduler (an LCM-LoRA member loaded elsewhere): swapped as LCM-LoRA users do
        scheduler = modules.scheduler
        if not isinstance(scheduler, LCMScheduler):
            scheduler = LCMScheduler.from_config(scheduler.config)
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon" or cfg.thresholding or cfg.clip_sample:
            raise ConfigError(
                "the LCM member's scheduler must predict epsilon without thresholding or clip_sample "
                f"(got prediction_type={cfg.prediction_type}, thresholding={cfg.thresholding}, "
                f"clip_sample={cfg.clip_sample})"
            )
        embedding_dim = _guidance_embedding_dim(modules.unet, guidance_scale)
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.noisy_final_step = noisy_final_step
        self.timestep_schedule = timestep_schedule
        # read once: a DDP-wrapped unet has no .config. None: no guidance embedding (LCM-LoRA), so
        # guidance_scale > 1 is classifier-free guidance by batch doubling instead
        self.time_cond_proj_dim = embedding_dim
        cfg_scale = guidance_scale if embedding_dim is None else 1.0
        self._init_pipeline(modules, resolution, cfg_scale)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

        t = lcm_timesteps(num_steps, cfg.original_inference_steps, cfg.num_train_timesteps, timestep_schedule)
        abar = scheduler.alphas_cumprod.float()
        # the transition out of step k lands on t_{k+1}; the reference code's extra final
        # transition re-uses t_H, as diffusers' step does when it has no next timestep.
        t_next = torch.cat([t[1:], t[-1:]])
        c_skip, c_out = zip(
            *(scheduler.get_scalings_for_boundary_condition_discrete(int(s)) for s in t), strict=True
        )
        self.timesteps = t
        # one (6, H) table of schedule constants, copied to each device once; gathered per sample on
        # the device, so the step loop never syncs with the host
        self._table_cpu = torch.stack(
            [
                abar[t].sqrt(),  # 0: sqrt(abar_t)
                (1 - abar[t]).sqrt(),  # 1: sqrt(1 - abar_t)
                torch.tensor(c_skip, dtype=torch.float32),  # 2: c_skip(t)
                torch.tensor(c_out, dtype=torch.float32),  # 3: c_out(t)
                abar[t_next].sqrt(),  # 4: sqrt(abar_next)
                (1 - abar[t_next]).sqrt(),  # 5: the policy's fixed std, H=8: 0.991 ... 0.430
            ]
        )
        self._w_embeddings: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_transitions(self) -> int:
        return self.num_steps if self.noisy_final_step else self.num_steps - 1

    def action_std(self) -> torch.Tensor:
        """Std of each trained transition, (T,)."""
        return self._table_cpu[5, : self.num_transitions].clone()

    def _w_embedding(
        self, batch: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> torch.Tensor:
        """The guidance embedding of w = guidance_scale - 1 for a batch: the UNet's timestep_cond.
        Computed once per (batch, dtype, device): it is constant, and a fresh one per step would be a
        host-to-device copy per UNet call."""
        device = self.device if device is None else device
        key = (batch, dtype, device)
        if key not in self._w_embeddings:
            w = torch.full((batch,), self.guidance_scale - 1.0)
            assert self.time_cond_proj_dim is not None  # only a guidance-distilled LCM has one
            emb = guidance_embedding(w, self.time_cond_proj_dim)
            self._w_embeddings[key] = emb.to(device=device, dtype=dtype)
        return self._w_embeddings[key]

    def _consts(self, step_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Schedule constants at per-sample steps k: (6, B, 1, 1, 1), rows as in `_table_cpu`."""
        return self._on("table", self._table_cpu, device)[:, step_index.to(device)].view(6, -1, 1, 1, 1)

    def _call_kwargs(self, batch: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """A guidance-distilled LCM gets the guidance as `timestep_cond` (no batch doubling); a UNet
        without that embedding (LCM-LoRA) is guided by one doubled batch when guidance_scale > 1.
        Sampling and training make the same call."""
        if self.time_cond_proj_dim is None:
            return {}
        return {"timestep_cond": self._w_embedding(batch, dtype, device)}

    def _mean(
        self, x_t: torch.Tensor, step_index: torch.Tensor, cond: Conditioning, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy mean sqrt(abar_next) * f_theta(x_t, t), the denoised estimate f_theta, and the std.

        The state stays fp32 whatever the UNet's dtype: only its input is cast, so recorded actions
        and recomputed log-probs see the same numbers under fp16/bf16.
        """
        c = self._consts(step_index, x_t.device)
        eps = self._eps(x_t, step_index, cond, training)
        denoised = lcm_denoise(eps, x_t, c[0], c[1], c[2], c[3])
        # 3. mean of the action: sqrt(abar_next) * denoised  (std sqrt(1 - abar_next) is fixed)
        return c[4] * denoised, denoised, c[5]

    def _rollout(self, cond: Conditioning, generator: Generators) -> Iterator[_sd.RolloutStep]:
        """The H steps of one rollout, lazily. Random draws as LatentConsistencyModelPipeline makes
        them: x_T, then one latent-shaped normal per noised transition, all from `generator`."""
        batch, device = len(cond), self.device
        shape, x = self._initial_state(cond, generator, self.init_noise_sigma)
        for k in range(self.num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            mean, denoised, std = self._mean(x, step, cond, training=False)
            if k == self.num_steps - 1 and not self.noisy_final_step:
                yield _sd.RolloutStep(x, None, mean, std, denoised)  # deterministic final call
                return
            x_next = mean + std * _sd.step_noise(shape, generator, device, cond.dtype)  # the action
            yield _sd.RolloutStep(x, x_next, mean, std, denoised)
            x = x_next

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: Generators) -> Trajectory:
        """Roll out H steps for a batch of prompts; records every trained transition. The image
        decodes the last call's denoised estimate."""
        cond = self.encode_prompts(prompts)
        transitions, final = [], None
        for step in self._rollout(cond, generator):
            if step.action is not None:
                transitions.append((step.x, step.action, gaussian_log_prob(step.action, step.mean, step.std)))
            final = step.x0_estimate
        assert final is not None
        return Trajectory.from_steps(prompts, cond, transitions, final, self.decode(final))

    @torch.no_grad()
    def estimates(self, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
        """After each UNet call, the LCM's current estimate of the clean latent: that call's `denoised`
        (the last one is what `sample` decodes)."""
        cond = self.encode_prompts(prompts)
        for step in self._rollout(cond, generator):
            yield step.x0_estimate

    def action_mean_std(
        self, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian action's mean sqrt(abar_next) * f_theta (with grad) and its fixed std, as
        `log_prob` scores them (the KL to the base model compares two such means)."""
        mean, _, std = self._mean(latents.float(), step_index, cond, training=True)
        return mean, std


def build_lcm_policy(
    family: Any,
    num_steps: int = 8,
    guidance_scale: float = 8.0,
    noisy_final_step: bool = False,
    resolution: int | None = None,
    timestep_schedule: str = "skip",
    device: torch.device | str = "cpu",
) -> LCMPolicy:
    """Load the family's LCM member and wrap it as a policy. `resolution=None` uses the member's own."""
    return _sd.from_family(
        LCMPolicy,
        family,
        device,
        resolution,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        noisy_final_step=noisy_final_step,
        timestep_schedule=timestep_schedule,
    )


# validation.check_sampler_fits_model runs the checks that need no weights against the model config
build_lcm_policy.check_family = lambda family, node: _sd.check_member_fits(  # type: ignore[attr-defined]
    LCMPolicy.member, family, node.get("resolution")
)

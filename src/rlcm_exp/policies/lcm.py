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
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import LCMScheduler

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies import _sd
from rlcm_exp.policies.base import DenoiserInputs, Generators
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


@dataclass
class _LCMStep:
    """One step of a rollout: the state, the action (None for the deterministic final call), the
    action's mean and std, and the call's denoised estimate f_theta(x_t, t)."""

    x: torch.Tensor
    x_next: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor
    denoised: torch.Tensor


class LCMPolicy:
    """Multistep LCM sampling as a `rlcm_exp.policies.base.Policy` over the family's "lcm" member.

    The public members implement that Protocol, so their signatures match it and DDIMPolicy's
    (ddim.py) on purpose; the constructor's module arguments are `_sd.pipeline_modules`."""

    member = "lcm"  # the model family's member this policy drives

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        num_steps: int,
        guidance_scale: float,
        noisy_final_step: bool,
        resolution: int,
        timestep_schedule: str = "skip",
        text_encoder_2: Any = None,  # SDXL's second text encoder (None: SD 1.x / 2.x)
        tokenizer_2: Any = None,
        force_zeros_for_empty_prompt: bool = True,  # SDXL: zeros as the unconditional half
    ) -> None:
        if num_steps < 2:
            raise ConfigError(
                f"sampler.num_steps={num_steps}: RLCM needs at least 2 steps. With one step the only UNet "
                "call is the deterministic final one, so there is no stochastic transition to train by policy "
                "gradient. Use sampler.num_steps=2 or more (the paper trains with 8)."
            )
        # a base's own scheduler (an LCM-LoRA member loaded elsewhere): swapped as LCM-LoRA users do
        if not isinstance(scheduler, LCMScheduler):
            scheduler = LCMScheduler.from_config(scheduler.config)
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon" or cfg.thresholding or cfg.clip_sample:
            raise ConfigError(
                "the LCM member's scheduler must predict epsilon without thresholding or clip_sample "
                f"(got prediction_type={cfg.prediction_type}, thresholding={cfg.thresholding}, "
                f"clip_sample={cfg.clip_sample})"
            )
        embedding_dim = _guidance_embedding_dim(unet, guidance_scale)
        self.denoiser, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.noisy_final_step = noisy_final_step
        self.timestep_schedule = timestep_schedule
        self.latent_channels = int(unet.config.in_channels)
        # read once: a DDP-wrapped unet has no .config. None: no guidance embedding (LCM-LoRA), so
        # guidance_scale > 1 is classifier-free guidance by batch doubling instead
        self.time_cond_proj_dim = embedding_dim
        cfg_scale = guidance_scale if embedding_dim is None else 1.0
        self.vae_scale = _sd.vae_scale_factor(vae)
        _sd.check_resolution(resolution, self.vae_scale)
        self.resolution = resolution
        pairs = [(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]
        self._text = _sd.text_conditioning(pairs, force_zeros_for_empty_prompt, resolution)
        _sd.prepare_vae(vae, self._text)
        self._cfg = _sd.ClassifierFreeGuidance(cfg_scale, self._text, lambda: self.device)
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
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._timesteps: dict[torch.device, torch.Tensor] = {}
        self._w_embeddings: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def num_transitions(self) -> int:
        return self.num_steps if self.noisy_final_step else self.num_steps - 1

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def action_std(self) -> torch.Tensor:
        """Std of each trained transition, (T,)."""
        return self._table_cpu[5, : self.num_transitions].clone()

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self._text.encode(prompts, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return _sd.decode(self.vae, latents)

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
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._table_cpu.to(device)
        return table[:, step_index.to(device)].view(6, -1, 1, 1, 1)

    def _timesteps_on(self, device: torch.device) -> torch.Tensor:
        cached = self._timesteps.get(device)
        if cached is None:
            cached = self._timesteps[device] = self.timesteps.to(device)
        return cached

    def denoiser_inputs(
        self,
        latents: torch.Tensor,
        step_index: torch.Tensor | int,
        cond: Conditioning,
        training: bool,
    ) -> DenoiserInputs:
        """(x, t, kwargs) of the UNet call at step k. A guidance-distilled LCM gets the guidance as
        `timestep_cond` (no batch doubling); a UNet without that embedding gets one doubled batch when
        guidance_scale > 1. Sampling and training (`training` is ignored) make the same call."""
        batch, device = latents.shape[0], latents.device
        step = _sd.step_indices(step_index, batch, device)
        t = self._timesteps_on(device)[step]
        # the UNet runs in the text encoder's dtype; the state itself stays float32 (see `_mean`)
        x = latents.to(cond.dtype)
        if self.time_cond_proj_dim is None:
            if self._cfg.enabled:
                return self._cfg.doubled(x, t, cond)
            return x, t, self._text.unet_kwargs(cond)
        w_emb = self._w_embedding(batch, cond.dtype, device)
        return x, t, {**self._text.unet_kwargs(cond), "timestep_cond": w_emb}

    def _mean(
        self, x_t: torch.Tensor, step_index: torch.Tensor, cond: Conditioning, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy mean sqrt(abar_next) * f_theta(x_t, t), the denoised estimate f_theta, and the std.

        The state stays fp32 whatever the UNet's dtype: only its input is cast, so recorded actions
        and recomputed log-probs see the same numbers under fp16/bf16.
        """
        c = self._consts(step_index, x_t.device)
        x, t, kwargs = self.denoiser_inputs(x_t, step_index, cond, training)
        eps = self.denoiser(x, t, **kwargs).sample.float()
        if self._cfg.enabled:
            eps = self._cfg.combine(eps)
        denoised = lcm_denoise(eps, x_t, c[0], c[1], c[2], c[3])
        # 3. mean of the action: sqrt(abar_next) * denoised  (std sqrt(1 - abar_next) is fixed)
        return c[4] * denoised, denoised, c[5]

    def _rollout(self, cond: Conditioning, generator: Generators) -> Iterator[_LCMStep]:
        """The H steps of one rollout, lazily. Random draws as LatentConsistencyModelPipeline makes
        them: x_T, then one latent-shaped normal per noised transition, all from `generator`."""
        batch, device = len(cond), self.device
        shape = _sd.latent_shape(batch, self.latent_channels, self.resolution, self.vae_scale)
        x = _sd.initial_latents(shape, generator, device, cond.dtype, self.init_noise_sigma)
        for k in range(self.num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            mean, denoised, std = self._mean(x, step, cond, training=False)
            if k == self.num_steps - 1 and not self.noisy_final_step:
                yield _LCMStep(x, None, mean, std, denoised)  # deterministic final call
                return
            x_next = mean + std * _sd.step_noise(shape, generator, device, cond.dtype)  # the action
            yield _LCMStep(x, x_next, mean, std, denoised)
            x = x_next

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: Generators) -> Trajectory:
        """Roll out H steps for a batch of prompts; records every trained transition. The image
        decodes the last call's denoised estimate."""
        cond = self.encode_prompts(prompts)
        transitions, final = [], None
        for step in self._rollout(cond, generator):
            if step.x_next is not None:
                transitions.append((step.x, step.x_next, gaussian_log_prob(step.x_next, step.mean, step.std)))
            final = step.denoised
        assert final is not None
        return Trajectory.from_steps(prompts, cond, transitions, final, self.decode(final))

    @torch.no_grad()
    def estimates(self, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
        """After each UNet call, the LCM's current estimate of the clean latent: that call's `denoised`
        (the last one is what `sample` decodes)."""
        cond = self.encode_prompts(prompts)
        for step in self._rollout(cond, generator):
            yield step.denoised

    # log pi_theta(next | latents), (B,) float32 with grad: the Gaussian of `action_mean_std`
    log_prob = _sd.gaussian_step_log_prob

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

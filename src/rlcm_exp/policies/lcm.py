"""Multistep latent-consistency sampling as a Gaussian policy (RLCM, arXiv 2404.03673, sec. 4).

State s_k = (x_{t_k}, t_k, prompt); one UNet call f_theta at t_k gives the action
    x_{t_{k+1}} ~ N( sqrt(abar_{t_{k+1}}) * denoised_theta(x_{t_k}, t_k),  (1 - abar_{t_{k+1}}) I ),
so only the mean depends on theta. The last call is deterministic (image = decode(denoised)), as in
diffusers and the paper: H steps give H-1 trained transitions. `noisy_final_step=True` reproduces
the reference code, which also noises the last step (with abar_{t_next} := abar_{t_H}) and trains
H transitions; that extra term has zero expected gradient, since the image decodes `denoised`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rl.gaussian import gaussian_log_prob


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


class LCMPolicy:
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
    ) -> None:
        if num_steps < 2:
            raise ConfigError(
                f"sampler.num_steps={num_steps}: RLCM needs at least 2 steps. With one step the only UNet "
                "call is the deterministic final one, so there is no stochastic transition to train by policy "
                "gradient. Use sampler.num_steps=2 or more (the paper trains with 8)."
            )
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon" or cfg.thresholding or cfg.clip_sample:
            raise ConfigError(
                "the LCM member's scheduler must predict epsilon without thresholding or clip_sample "
                f"(got prediction_type={cfg.prediction_type}, thresholding={cfg.thresholding}, "
                f"clip_sample={cfg.clip_sample})"
            )
        if getattr(unet.config, "time_cond_proj_dim", None) is None:
            raise ConfigError(
                "the LCM member's UNet has no time_cond_proj_dim (no guidance embedding): it is not a "
                "guidance-distilled latent consistency model. Point model.lcm at an LCM, or use sampler=ddim."
            )
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.noisy_final_step = noisy_final_step
        self.timestep_schedule = timestep_schedule
        self.resolution = resolution
        self.latent_channels = unet.config.in_channels
        self.time_cond_proj_dim = (
            unet.config.time_cond_proj_dim
        )  # read once: a DDP-wrapped unet has no .config
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
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

    @property
    def num_transitions(self) -> int:
        return self.num_steps if self.noisy_final_step else self.num_steps - 1

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def action_std(self) -> torch.Tensor:
        """Std of each trained transition, (T,)."""
        return self._table_cpu[5, : self.num_transitions].clone()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def _w_embedding(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        w = torch.full((batch,), self.guidance_scale - 1.0)
        emb = guidance_embedding(w, self.time_cond_proj_dim)
        return emb.to(device=self.device, dtype=dtype)

    def _consts(self, step_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Schedule constants at per-sample steps k: (6, B, 1, 1, 1), rows as in `_table_cpu`."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._table_cpu.to(device)
        return table[:, step_index.to(device)].view(6, -1, 1, 1, 1)

    def _mean(
        self, x_t: torch.Tensor, step_index: torch.Tensor, prompt_embeds: torch.Tensor, w_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy mean sqrt(abar_next) * f_theta(x_t, t), the denoised estimate f_theta, and the std.

        The state stays fp32 whatever the UNet's dtype: only its input is cast, so recorded actions
        and recomputed log-probs see the same numbers under fp16/bf16.
        """
        c = self._consts(step_index, x_t.device)
        t = self._timesteps_on(x_t.device)[step_index.to(x_t.device)]
        eps = self.unet(
            x_t.to(prompt_embeds.dtype), t, encoder_hidden_states=prompt_embeds, timestep_cond=w_emb
        ).sample.float()
        denoised = lcm_denoise(eps, x_t, c[0], c[1], c[2], c[3])
        # 3. mean of the action: sqrt(abar_next) * denoised  (std sqrt(1 - abar_next) is fixed)
        return c[4] * denoised, denoised, c[5]

    def _timesteps_on(self, device: torch.device) -> torch.Tensor:
        cached = self._timesteps.get(device)
        if cached is None:
            cached = self._timesteps[device] = self.timesteps.to(device)
        return cached

    @torch.no_grad()
    def sample(
        self, prompts: list[str], generator: torch.Generator | None, progress: bool = False
    ) -> Trajectory:
        """Roll out H steps for a batch of prompts; records every trained transition."""
        embeds = self.encode_prompts(prompts)
        batch, device = len(prompts), self.device
        side = self.resolution // self.vae_scale
        shape = (batch, self.latent_channels, side, side)
        x = (
            randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype).float()
            * self.init_noise_sigma
        )
        w_emb = self._w_embedding(batch, embeds.dtype)
        latents, next_latents, log_probs = [], [], []
        denoised = x
        for k in tqdm(range(self.num_steps), desc="lcm steps", leave=False, disable=not progress):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            mean, denoised, std = self._mean(x, step, embeds, w_emb)
            if k == self.num_steps - 1 and not self.noisy_final_step:
                break  # deterministic final call: the image is decode(denoised)
            z = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype).float()
            x_next = mean + std * z  # the action
            latents.append(x)
            next_latents.append(x_next)
            log_probs.append(gaussian_log_prob(x_next, mean, std))
            x = x_next
        return Trajectory(
            prompts=list(prompts),
            prompt_embeds=embeds,
            latents=torch.stack(latents, dim=1),
            next_latents=torch.stack(next_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            images=self.decode(denoised),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode((latents / self.vae.config.scaling_factor).to(vae_dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """log pi_theta(next | latents) at per-sample transition indices (B,), with grad; (B,) float32."""
        w_emb = self._w_embedding(latents.shape[0], prompt_embeds.dtype)
        mean, _, std = self._mean(latents.float(), step_index, prompt_embeds, w_emb)
        return gaussian_log_prob(next_latents, mean, std)


def build_lcm_policy(
    family,
    num_steps: int = 8,
    guidance_scale: float = 8.0,
    noisy_final_step: bool = False,
    resolution: int | None = None,
    timestep_schedule: str = "skip",
    device: torch.device | str = "cpu",
) -> LCMPolicy:
    """Load the family's LCM member and wrap it as a policy. `resolution=None` uses the member's own."""
    pipe = family.load("lcm", device)
    return LCMPolicy(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        noisy_final_step=noisy_final_step,
        resolution=resolution or family.member("lcm").resolution,
        timestep_schedule=timestep_schedule,
    )

"""DDIM sampling with eta > 0 as a Gaussian policy (the DDPO baseline, Black et al. 2023, sec. 4.2).

State s_k = (x_{t_k}, t_k, prompt) for the H scheduler timesteps t_1 > ... > t_H (steps_offset=1,
H=50: 981, 961, ..., 1). One (classifier-free guided) UNet call eps_theta at t_k gives the action
    x_{t_prev} ~ N( sqrt(abar_prev) * x0_hat + sqrt(1 - abar_prev - sigma_t^2) * eps_theta,  sigma_t^2 I ),
    x0_hat = (x_t - sqrt(1 - abar_t) * eps_theta) / sqrt(abar_t),
    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)),
with t_prev = t - num_train // H and abar_prev := the scheduler's final_alpha_cumprod when t_prev < 0
(DDIM eq. 12 and 16, as diffusers' DDIMScheduler.step computes it without clipping). Only the mean
depends on theta. Every step is stochastic, so all H transitions are trained; the image decodes the
last action x_{t_H prev} itself. eta = 0 is plain DDIM: deterministic, no density, not trainable.

Classifier-free guidance doubles the batch: eps = eps_u + g * (eps_c - eps_u) with eps_u the UNet's
prediction for the empty prompt. DDPO applies it both when sampling and when recomputing log-probs
(`train_cfg=True`), so the first PPO ratio is exactly 1. With `train_cfg=False` log_prob uses the
conditional prediction alone: half the UNet cost, but the recomputed mean is no longer the mean the
action was drawn from, so the first ratio is not 1 (unless guidance_scale <= 1, i.e. no guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from rlcm_exp.errors import ConfigError
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
    final_alpha_cumprod: float | torch.Tensor,
    eta: float,
) -> DDIMCoefficients:
    """The schedule constants of every step, for a scheduler with num_train = len(alphas_cumprod).

    Computed in float64 and rounded once to float32, so they agree with diffusers' float32
    arithmetic to an ulp.
    """
    abar = alphas_cumprod.double()
    t = timesteps.long()
    # 1. t_prev = t - num_train // H: diffusers' rule for every timestep spacing (with "leading"
    #    spacing t_prev is exactly the next timestep; the last step has t_prev < 0)
    t_prev = t - len(abar) // len(t)
    # 2. abar_t, and abar_prev := final_alpha_cumprod past the end of the chain
    abar_t = abar[t]
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float64)
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


class DDIMPolicy:
    def __init__(
        self,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer,
        scheduler,
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
        sched = DDIMScheduler.from_config(scheduler.config)
        cfg = sched.config
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
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler = sched
        self.num_steps = num_steps
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.train_cfg = train_cfg
        self.resolution = resolution
        # diffusers' ModelMixin (a torch.nn.Module) carries its config; typed loosely here
        self._vae_config: Any = cast(Any, vae).config
        self.latent_channels = int(cast(Any, unet).config.in_channels)
        self.vae_scale = 2 ** (len(self._vae_config.block_out_channels) - 1)
        if resolution % self.vae_scale:
            raise ConfigError(
                f"sampler.resolution={resolution} is not a multiple of the VAE's factor {self.vae_scale}"
            )
        self.init_noise_sigma = float(sched.init_noise_sigma)

        sched.set_timesteps(num_steps)
        self.timesteps = sched.timesteps.detach().cpu().long().clone()
        self._coefs = ddim_coefficients(sched.alphas_cumprod, self.timesteps, sched.final_alpha_cumprod, eta)
        self._table = self._coefs.stacked()  # (5, H) float32, CPU
        # device copies of the table and timesteps, moved once per device rather than once per step
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # the empty-prompt embedding for CFG: the text encoder is frozen, so it is computed once
        self._uncond: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def use_cfg(self) -> bool:
        """Classifier-free guidance in sampling (the pipeline's rule: guidance_scale > 1)."""
        return self.guidance_scale > 1.0

    @property
    def num_transitions(self) -> int:
        return self.num_steps  # every DDIM step with eta > 0 is stochastic

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def action_std(self) -> torch.Tensor:
        """Std sigma_t of each trained transition, (T,)."""
        return self._coefs.sigma.clone()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder states, tokenised exactly as StableDiffusionPipeline.encode_prompt does."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def _uncond_embeds(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._uncond:
            self._uncond[key] = self.encode_prompts([""]).to(device=device, dtype=dtype)
        return self._uncond[key]

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self._table.to(device), self.timesteps.to(device))
        return self._on_device[device]

    def _eps(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, cfg: bool) -> torch.Tensor:
        """eps_theta(x, t) in float32; t is (B,). With cfg, one doubled batch (uncond first, as diffusers)."""
        x_in = x.to(prompt_embeds.dtype)  # the UNet runs in the text encoder's dtype, like the pipeline
        if not cfg:
            return self.unet(x_in, t, encoder_hidden_states=prompt_embeds).sample.float()
        uncond = self._uncond_embeds(prompt_embeds.device, prompt_embeds.dtype).expand(x.shape[0], -1, -1)
        eps = self.unet(
            torch.cat([x_in, x_in]),
            torch.cat([t, t]),
            encoder_hidden_states=torch.cat([uncond, prompt_embeds]),
        ).sample.float()
        eps_u, eps_c = eps.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)

    def _mean(
        self, x_t: torch.Tensor, step_index: torch.Tensor, prompt_embeds: torch.Tensor, cfg: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy mean (float32) and std (B, 1, 1, 1) at per-sample step indices (B,) on x_t's device."""
        table, timesteps = self._tables(x_t.device)
        # one gather for all constants: (5, B) -> five (B, 1, 1, 1) tensors, no host round trip
        sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction, sigma = table[:, step_index].view(5, -1, 1, 1, 1)
        eps = self._eps(x_t, timesteps[step_index], prompt_embeds, cfg)
        return ddim_mean(eps, x_t.float(), sqrt_abar, sqrt_1m_abar, sqrt_abar_prev, direction), sigma

    @torch.no_grad()
    def sample(
        self, prompts: list[str], generator: torch.Generator | None, progress: bool = False
    ) -> Trajectory:
        """Roll out H DDIM steps for a batch of prompts; records all H transitions.

        Random draws follow StableDiffusionPipeline + DDIMScheduler.step(eta, generator): x_T first,
        then one latent-shaped normal per step, all from `generator` in the pipeline's dtype, so
        the same seed gives the pipeline's image. The state is kept in float32 whatever the model
        dtype, so the recorded actions are exact.
        """
        embeds = self.encode_prompts(prompts)
        batch, device = len(prompts), self.device
        side = self.resolution // self.vae_scale
        shape = (batch, self.latent_channels, side, side)
        x = (
            randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
            * self.init_noise_sigma
        )
        x = x.float()
        latents, next_latents, log_probs = [], [], []
        for k in tqdm(range(self.num_steps), desc="ddim steps", leave=False, disable=not progress):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            mean, sigma = self._mean(x, step, embeds, self.use_cfg)
            # DDIMScheduler.step's draw: model_output's shape and dtype, the pipeline's generator
            z = randn_tensor(shape, generator=generator, device=device, dtype=embeds.dtype)
            x_prev = mean + sigma * z.float()  # the action
            latents.append(x)
            next_latents.append(x_prev)
            log_probs.append(gaussian_log_prob(x_prev, mean, sigma))
            x = x_prev
        return Trajectory(
            prompts=list(prompts),
            prompt_embeds=embeds,
            latents=torch.stack(latents, dim=1),
            next_latents=torch.stack(next_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            images=self.decode(x),
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        image = cast(Any, self.vae).decode((latents / self._vae_config.scaling_factor).to(dtype)).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def log_prob(
        self,
        latents: torch.Tensor,
        next_latents: torch.Tensor,
        step_index: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """log pi_theta(next | latents) at per-sample step indices (B,), with grad; (B,) float32.

        CFG (one doubled batch) is applied when sampling used it and `train_cfg` is set.
        """
        step_index = step_index.to(device=latents.device, dtype=torch.long)
        mean, sigma = self._mean(latents, step_index, prompt_embeds, self.use_cfg and self.train_cfg)
        return gaussian_log_prob(next_latents, mean, sigma)


def build_ddim_policy(
    family,
    num_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    train_cfg: bool = True,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
) -> DDIMPolicy:
    """Load the family's diffusion member and wrap it as a DDIM policy. `resolution=None` uses the member's own."""
    pipe = family.load("diffusion", device)
    return DDIMPolicy(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        num_steps=num_steps,
        eta=eta,
        guidance_scale=guidance_scale,
        train_cfg=train_cfg,
        resolution=resolution or family.member("diffusion").resolution,
    )

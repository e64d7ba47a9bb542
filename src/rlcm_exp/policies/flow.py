"""Rectified-flow samplers (Flow-SDE, CPS, consistency re-noise) as one Gaussian policy over SD3 and
FLUX.1 transformers and the toy flow pair's UNets.

One class holds the three samplers (../shared/flow-models.md): the denoiser's velocity v gives
(x0_hat, eps_hat), and a per-step table (a_k, b_k, std_k) built by flow_steps.step_table says what
step k does: x_{k+1} ~ N(a_k x0_hat + b_k eps_hat, std_k^2 I). A step with std_k = 0 is the
deterministic Euler step (outside `sampler.stochastic_steps`, or CPS's and the re-noise's last
step); the steps with std_k > 0 are the trained transitions, in rollout order. The log-probability
is the true Gaussian density of the recorded action, averaged over latent elements (rl/gaussian.py),
for every sampler, CPS included (its public implementations use -(x - mean)^2 instead).

Family specifics live in two small classes: SD3 (two CLIPs + T5, pooled projections, classifier-free
guidance by batch doubling, timestep 1000 s) and FLUX.1 (CLIP pooled + T5 states, text and image
ids, 2x2-packed latents, timestep s, a guidance embedding on FLUX.1-dev, none on schnell). A UNet
member (model=toy_flow: StableDiffusionPipeline folders holding a FlowMatchEulerDiscreteScheduler) is
conditioned as SD 1.5 (_sd.SDText) at timestep 1000 s, guided classifier-free by batch doubling, or by
its guidance embedding (w = guidance_scale - 1, as an LCM) when the UNet has one (the toy student);
the few-step UNet member steps on the grid 1, 1 - 1/H, ..., 1/H it was distilled on
(rlcm_exp.toy.flow.consistency_grid, as FLUX.1-schnell's pipeline), the many-step one on its
scheduler's own grid. The policy's state is always the unpacked (B, C, h, w) float32 latent, the pipelines' draws in their order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import check_resolution as check_member_resolution
from rlcm_exp.models.hub import MemberSource, local_vae_scale, member_config
from rlcm_exp.policies import _sd
from rlcm_exp.policies.base import DenoiserInputs, Generators
from rlcm_exp.policies.conditioning import Conditioning
from rlcm_exp.policies.flow_steps import (
    check_stochastic_steps,
    flow_sigmas,
    resolution_mu,
    step_mean,
    step_table,
)
from rlcm_exp.policies.lcm import guidance_embedding
from rlcm_exp.policies.trajectory import Trajectory
from rlcm_exp.rl.gaussian import gaussian_log_prob

# scheduler options whose grid or step the policy's table does not model
UNSUPPORTED_SCHEDULER = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
    "invert_sigmas",
    "stochastic_sampling",
)


def _clip_states(
    tokenizer: Any, encoder: Any, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, ...]:
    """(penultimate hidden states, pooled projection) of a CLIP with projection, as SD3 encodes them."""
    ids = _sd.tokenize(tokenizer, prompts).input_ids.to(device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _t5_states(
    tokenizer: Any, encoder: Any, prompts: list[str], length: int, device: torch.device
) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return encoder(ids.to(device))[0]


class SD3Text:
    """SD3 / SD3.5 conditioning as StableDiffusion3Pipeline computes it: both CLIPs' penultimate
    states concatenated and zero-padded to T5's width, then T5's states after them ("states",
    (B, 77 + L, D)); both CLIPs' pooled projections concatenated ("pooled", (B, P1 + P2))."""

    def __init__(self, tokenizers: list[Any], encoders: list[Any], t5_length: int) -> None:
        self.tokenizers, self.encoders, self.t5_length = tokenizers, encoders, t5_length

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        (s1, p1), (s2, p2) = (
            _clip_states(tok, enc, prompts, device)
            for tok, enc in zip(self.tokenizers[:2], self.encoders[:2], strict=True)
        )
        dtype = self.encoders[0].dtype
        t5 = _t5_states(self.tokenizers[2], self.encoders[2], prompts, self.t5_length, device).to(dtype)
        clip = torch.cat([s1, s2], dim=-1).to(dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(
            {"states": torch.cat([clip, t5], dim=-2), "pooled": torch.cat([p1, p2], dim=-1).to(dtype)}
        )

    def empty(self, device: torch.device) -> Conditioning:
        """The unconditional half of classifier-free guidance: the empty prompt through all three."""
        return self.encode([""], device)

    def unet_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.field("states"), "pooled_projections": cond.field("pooled")}


class FluxText:
    """FLUX.1 conditioning as FluxPipeline computes it: T5's states ("states", (B, L, D)) and CLIP's
    pooled output ("pooled", (B, P)). The text ids (zeros, (L, 3)) are the same for every row, so
    they are not in the record."""

    def __init__(self, tokenizers: list[Any], encoders: list[Any], t5_length: int) -> None:
        self.tokenizers, self.encoders, self.t5_length = tokenizers, encoders, t5_length

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        ids = _sd.tokenize(self.tokenizers[0], prompts).input_ids.to(device)
        pooled = self.encoders[0](ids, output_hidden_states=False).pooler_output.to(self.encoders[0].dtype)
        states = _t5_states(self.tokenizers[1], self.encoders[1], prompts, self.t5_length, device)
        return Conditioning({"states": states.to(self.encoders[1].dtype), "pooled": pooled})

    def unet_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        states = cond.field("states")
        txt_ids = torch.zeros(states.shape[1], 3, device=states.device, dtype=self.encoders[0].dtype)
        return {
            "encoder_hidden_states": states,
            "pooled_projections": cond.field("pooled"),
            "txt_ids": txt_ids,
        }


def pack(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing: (B, C, h, w) -> (B, h/2 * w/2, 4C) tokens."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = tokens.shape
    return tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """FLUX's image-token positions, (h/2 * w/2, 3): (0, row, column) of each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


@dataclass
class _FlowStep:
    """One step of a rollout: the state, the next state, the step's mean and std, and x0_hat."""

    x: torch.Tensor
    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    x0_hat: torch.Tensor
    stochastic: bool


class FlowPolicy:
    """A rectified-flow sampler as a `rlcm_exp.policies.base.Policy` over an SD3 or FLUX.1 member.

    The trainer's transition index j is the j-th stochastic step (`trained_steps[j]`);
    `denoiser_inputs` takes a step index k in 0..H-1. The denoiser is called as
    `denoiser(hidden_states=x, timestep=t, **kwargs)` (a transformer) or `denoiser(x, t, **kwargs)`
    (a UNet)."""

    def __init__(
        self,
        pipe: Any,
        sampler: str,
        member: str,
        num_steps: int,
        guidance_scale: float,
        resolution: int,
        stochastic_steps: list[int] | None = None,
        noise_level: float = 0.7,
        eta: float = 1.0,
    ) -> None:
        if num_steps < 1:
            raise ConfigError(f"sampler.num_steps={num_steps}: a flow sampler needs at least one step")
        self.member, self.sampler = member, sampler
        self.unet = getattr(pipe, "transformer", None) is None  # the toy flow pair's UNets
        self.denoiser, self.vae = (pipe.unet if self.unet else pipe.transformer), pipe.vae
        self.flux = type(pipe).__name__.startswith("Flux")
        self.tokenizer = pipe.tokenizer
        self.num_steps, self.guidance_scale = num_steps, float(guidance_scale)
        self.latent_channels = int(self.denoiser.config.in_channels) // (4 if self.flux else 1)
        self.vae_scale = _sd.vae_scale_factor(self.vae)
        patch = 2 if self.flux else 1 if self.unet else int(self.denoiser.config.patch_size)
        _sd.check_resolution(resolution, self.vae_scale * patch)
        self.resolution = resolution
        self._text: Any = _text_conditioning(pipe, self.flux, self.unet)
        # a guidance embedding: FLUX.1-dev's `guidance`, or a UNet's w embedding (time_cond_proj_dim)
        self._w_dim = getattr(self.denoiser.config, "time_cond_proj_dim", None) if self.unet else None
        self._embedded_guidance = bool(getattr(self.denoiser.config, "guidance_embeds", False))
        _check_guidance(self.flux, self._embedded_guidance, self.guidance_scale, member)
        embedded = self.flux or self._w_dim is not None  # no batch doubling
        cfg_scale = 1.0 if embedded else self.guidance_scale
        self._cfg = _sd.ClassifierFreeGuidance(cfg_scale, self._text, lambda: self.device)
        self.init_noise_sigma = 1.0
        self.table = step_table(
            sampler, self._sigmas(pipe.scheduler.config, patch), stochastic_steps, noise_level, eta
        )
        self.timesteps = (self.table.sigmas[:-1] * pipe.scheduler.config.num_train_timesteps).float()
        self._trained = self.table.trained_steps
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _sigmas(self, config: Any, patch: int) -> torch.Tensor:
        """The grid s_0..s_H as the family's pipeline asks its FlowMatchEulerDiscreteScheduler for it."""
        bad = [key for key in UNSUPPORTED_SCHEDULER if config.get(key)]
        if bad or config.get("time_shift_type", "exponential") != "exponential":
            raise ConfigError(
                f"the {self.member} member's scheduler config sets {bad or ['time_shift_type']}: the flow "
                "policy models FlowMatchEulerDiscreteScheduler's plain grid with SD3's or FLUX's shift only"
            )
        side = self.resolution // self.vae_scale
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = resolution_mu(
                (side // patch) ** 2,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.15),
            )
        base = None
        # FluxPipeline's own linear grid 1, 1 - 1/H, ..., 1/H; also the toy student's (its distillation's)
        if self.flux or (self.unet and self.member == "lcm"):
            base = torch.from_numpy(np.linspace(1.0, 1 / self.num_steps, self.num_steps))
        return flow_sigmas(
            self.num_steps, float(config.get("shift", 1.0)), mu, base, config.num_train_timesteps
        )

    @property
    def num_transitions(self) -> int:
        return len(self._trained)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def action_std(self) -> torch.Tensor:
        """Std of each trained transition, (T,)."""
        return self.table.std[self._trained].clone()

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return self._text.encode(prompts, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]: SD3 and FLUX undo both the VAE's scaling and its shift."""
        cfg = self.vae.config
        return _sd.decode(self.vae, latents + cfg.scaling_factor * float(cfg.shift_factor or 0.0))

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._on_device:
            self._on_device[device] = (
                self.table.stacked().to(device),
                self.timesteps.to(device),
                self._trained.to(device),
            )
        return self._on_device[device]

    def denoiser_inputs(
        self, latents: torch.Tensor, step_index: torch.Tensor | int, cond: Conditioning, training: bool
    ) -> DenoiserInputs:
        """(hidden_states, timestep, kwargs) of step k's call: SD3 on the latent at 1000 s, batch
        doubled under guidance; FLUX on the packed latent at s with ids and its guidance embedding.
        Sampling and training (`training` is ignored) make the same call."""
        batch, device = latents.shape[0], latents.device
        step = _sd.step_indices(step_index, batch, device)
        t = self._tables(device)[1][step]
        x = latents.to(cond.dtype)
        if not self.flux:  # SD3 and the UNets: the timestep 1000 s, batch doubled under guidance
            return self._unet_inputs(x, t, cond)
        h, w = x.shape[-2:]
        kwargs = {**self._text.unet_kwargs(cond), "img_ids": image_ids(h, w).to(device, cond.dtype)}
        if self._embedded_guidance:
            kwargs["guidance"] = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
        return pack(x), t.to(cond.dtype) / 1000, kwargs

    def _unet_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> DenoiserInputs:
        """SD3's or a UNet member's call: one classifier-free doubled batch when guidance_scale > 1, unless
        the UNet has a guidance embedding, which takes w = guidance_scale - 1 as `timestep_cond`."""
        if self._cfg.enabled:
            return self._cfg.doubled(x, t, cond)
        kwargs = self._text.unet_kwargs(cond)
        if self._w_dim is not None:
            w = torch.full((x.shape[0],), self.guidance_scale - 1.0)
            kwargs["timestep_cond"] = guidance_embedding(w, int(self._w_dim)).to(x.device, cond.dtype)
        return x, t, kwargs

    def velocity(self, latents: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The (guided) velocity v at step k, float32, in the latent's (B, C, h, w) layout."""
        x, t, kwargs = self.denoiser_inputs(latents, step, cond, training=False)
        if self.unet:
            v = self.denoiser(x, t, **kwargs).sample.float()
            return self._cfg.combine(v) if self._cfg.enabled else v
        v = self.denoiser(hidden_states=x, timestep=t, **kwargs, return_dict=False)[0].float()
        if self.flux:
            return unpack(v, *latents.shape[-2:])
        return self._cfg.combine(v) if self._cfg.enabled else v

    def _mean(
        self, x: torch.Tensor, step: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step k's mean a_k x0_hat + b_k eps_hat, its std and x0_hat, from one denoiser call."""
        s, a, b, std = self._tables(x.device)[0][:, step].view(4, -1, 1, 1, 1)
        v = self.velocity(x, step, cond)
        return step_mean(x, v, s, a, b), std, x - s * v

    def _rollout(self, cond: Conditioning, generator: Generators) -> Iterator[_FlowStep]:
        """The H steps, lazily. Draws as the pipelines make them: x_1 first (the latent shape, before
        FLUX packs it), then one latent-shaped normal per stochastic step."""
        batch, device = len(cond), self.device
        shape = _sd.latent_shape(batch, self.latent_channels, self.resolution, self.vae_scale)
        x = _sd.initial_latents(shape, generator, device, cond.dtype, self.init_noise_sigma)
        stochastic = self.table.stochastic.tolist()
        for k in range(self.num_steps):
            step = torch.full((batch,), k, dtype=torch.long, device=device)
            mean, std, x0_hat = self._mean(x, step, cond)
            x_next = (
                mean + std * _sd.step_noise(shape, generator, device, cond.dtype) if stochastic[k] else mean
            )
            yield _FlowStep(x, x_next, mean, std, x0_hat, stochastic[k])
            x = x_next

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: Generators) -> Trajectory:
        """Roll out H steps; records every stochastic step. The image decodes the last state."""
        cond = self.encode_prompts(prompts)
        transitions, final = [], None
        for step in self._rollout(cond, generator):
            if step.stochastic:
                transitions.append((step.x, step.x_next, gaussian_log_prob(step.x_next, step.mean, step.std)))
            final = step.x_next
        assert final is not None
        if not transitions:  # no trained step (noise 0): an empty (B, 0, ...) record
            empty = final.new_zeros((len(prompts), 0, *final.shape[1:]))
            zero = final.new_zeros((len(prompts), 0))
            return Trajectory(list(prompts), cond, empty, empty.clone(), zero, final, self.decode(final))
        return Trajectory.from_steps(prompts, cond, transitions, final, self.decode(final))

    @torch.no_grad()
    def estimates(self, prompts: list[str], generator: Generators) -> Iterator[torch.Tensor]:
        """After each step, its x0_hat; after the last, the final state (what `sample` decodes)."""
        cond = self.encode_prompts(prompts)
        for k, step in enumerate(self._rollout(cond, generator)):
            yield step.x_next if k == self.num_steps - 1 else step.x0_hat

    # log pi_theta(next | latents), (B,) float32 with grad: the Gaussian of `action_mean_std`
    log_prob = _sd.gaussian_step_log_prob

    def action_mean_std(
        self, latents: torch.Tensor, step_index: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (with grad) and fixed std of the trained transition `step_index` (0..T-1, the j-th
        stochastic step), as `log_prob` scores them."""
        step = self._tables(latents.device)[2][step_index.to(device=latents.device, dtype=torch.long)]
        mean, std, _ = self._mean(latents.float(), step, cond)
        return mean, std


def _text_conditioning(pipe: Any, flux: bool, unet: bool) -> Any:
    """The family's text conditioning: SD 1.5's (a UNet member), FLUX.1's or SD3's."""
    if unet:
        return _sd.SDText(pipe.tokenizer, pipe.text_encoder)
    t5_tokenizer = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    t5_length = min(512 if flux else 256, int(t5_tokenizer.model_max_length))
    if flux:
        return FluxText(
            [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], t5_length
        )
    encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    return SD3Text([pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3], encoders, t5_length)


def _check_guidance(flux: bool, embedded: bool, scale: float, member: str) -> None:
    """FLUX.1-schnell has no guidance at all (no embedding; the policy runs no classifier-free
    guidance on FLUX): refuse a guidance scale it would silently ignore."""
    if flux and not embedded and scale > 1.0:
        raise ConfigError(
            f"sampler.guidance_scale={scale}: the {member} member (FLUX.1-schnell-like) has no guidance "
            "embedding, and FLUX runs no classifier-free guidance here; use sampler.guidance_scale=1"
        )


def _possible_stochastic(kind: str, num_steps: int, noise_level: float, eta: float) -> torch.Tensor:
    """Which steps the sampler can make stochastic, for any grid ending at 0: all steps for the
    Flow-SDE (noise level > 0), all but the last for CPS (eta > 0) and the re-noise."""
    possible = torch.ones(num_steps, dtype=torch.bool)
    if kind != "flow_sde":
        possible[-1] = False
    if (kind == "flow_sde" and noise_level == 0) or (kind == "cps" and eta == 0):
        possible[:] = False
    return possible


def _patch_factor(is_flux: bool, transformer: dict[str, Any]) -> int:
    """Latent cells per token along a side: FLUX packs 2x2, SD3 patches by its config's patch_size."""
    return 2 if is_flux else int(transformer.get("patch_size", 2))


def check_member_fits(
    kind: str, member: str, family: Any, resolution: int | None, **options: Any
) -> MemberSource:
    """The checks of sampler `kind` over the family's `member` that read only configs, never weights:
    the family's process and member, sampler.stochastic_steps, the resolution against the VAE and the
    transformer's patching, and the guidance the member supports. Returns the member's source."""
    check_process: Callable[[str, str], None] | None = getattr(family, "check_process", None)
    if check_process is None:
        raise ConfigError(f"sampler={kind} needs a rectified-flow family (model=tiny_sd35, tiny_flux1, ...)")
    check_process("rectified_flow", kind)
    num_steps = int(options["num_steps"])
    if num_steps < 1:
        raise ConfigError(f"sampler.num_steps={num_steps}: a flow sampler needs at least one step")
    check_stochastic_steps(
        options.get("stochastic_steps"),
        _possible_stochastic(kind, num_steps, options.get("noise_level", 0.7), options.get("eta", 1.0)),
        kind,
    )
    check_member_resolution(family, member, resolution)
    source: MemberSource = family.member(member)
    transformer = member_config(source, "transformer/config.json") or {}
    if not transformer:  # a hub member not on this machine yet: FlowPolicy checks once it is loaded
        return source
    is_flux = "Flux" in str(transformer.get("_class_name", ""))
    _check_guidance(is_flux, bool(transformer.get("guidance_embeds")), options["guidance_scale"], member)
    side, scale = resolution or source.resolution, local_vae_scale(source)
    if side is not None and scale is not None and side % (scale * _patch_factor(is_flux, transformer)):
        cell = scale * _patch_factor(is_flux, transformer)
        raise ConfigError(
            f"sampler.resolution={side}: the {member} member's VAE ({scale} px per latent cell) and its "
            f"transformer's {cell // scale}x{cell // scale} patches need a multiple of {cell}; "
            f"use e.g. {max(cell, side - side % cell)} (or null for the model's own resolution)"
        )
    return source


def _from_family(
    kind: str, member: str, family: Any, device: torch.device | str, resolution: int | None, **options: Any
) -> FlowPolicy:
    """The sampler `kind` over the family's `member`, after the checks that need no weights
    (`check_member_fits`)."""
    source = check_member_fits(kind, member, family, resolution, **options)
    pipe = family.load(member, device)
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    native = source.resolution or int(getattr(denoiser.config, "sample_size", 128)) * _sd.vae_scale_factor(
        pipe.vae
    )
    return FlowPolicy(pipe, kind, member, resolution=resolution or native, **options)


# each flow sampler (conf/sampler/<kind>.yaml) -> the family member it drives and its own option
FLOW_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "flow_sde": ("diffusion", "noise_level"),  # Flow-GRPO's SDE over the many-step member
    "cps": ("diffusion", "eta"),  # coefficients-preserving sampling over the many-step member
    "flow_consistency": ("lcm", None),  # RLCM's multistep consistency step over the few-step member
}


def flow_sampler(
    kind: str, noise_level: float | None = None, eta: float | None = None
) -> tuple[str, dict[str, float]]:
    """The member sampler `kind` drives and its own option; an option of another flow sampler (the
    DDPO paper layer's `sampler.eta` under sampler=flow_sde, say) is a ConfigError naming it."""
    if kind not in FLOW_SAMPLERS:
        raise ConfigError(f"sampler.kind={kind!r} is not a flow sampler (one of {sorted(FLOW_SAMPLERS)})")
    member, own = FLOW_SAMPLERS[kind]
    given = {name: value for name, value in (("noise_level", noise_level), ("eta", eta)) if value is not None}
    for name, value in given.items():
        if name != own:
            raise ConfigError(
                f"sampler.{name}={value!r} is not an option of sampler={kind} (its own: {own or 'none'}); "
                "the paper layer sets its own sampler's options, so with another sampler add ~paper"
            )
    return member, given


def build_flow_policy(
    family: Any,
    kind: str,
    num_steps: int,
    guidance_scale: float,
    noise_level: float | None = None,
    eta: float | None = None,
    stochastic_steps: list[int] | None = None,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
) -> FlowPolicy:
    """The flow sampler `kind` (FLOW_SAMPLERS; conf/sampler/{flow_sde,cps,flow_consistency}.yaml) over
    the family member it drives; `noise_level` is flow_sde's, `eta` cps's."""
    member, own = flow_sampler(kind, noise_level, eta)
    options = {"num_steps": num_steps, "guidance_scale": guidance_scale, "stochastic_steps": stochastic_steps}
    return _from_family(kind, member, family, device, resolution, **options, **own)


def check_flow_config(family: Any, node: Any) -> None:
    """A flow sampler config (conf/sampler/<kind>.yaml, composed) against the model family, without
    loading any weights: `build_flow_policy`'s checks before it loads."""
    kind = str(node.get("kind"))
    member, own = flow_sampler(kind, node.get("noise_level"), node.get("eta"))
    steps = node.get("stochastic_steps")
    options = {
        "num_steps": node.get("num_steps"),
        "guidance_scale": node.get("guidance_scale"),
        "stochastic_steps": None if steps is None else list(steps),
    }
    check_member_fits(kind, member, family, node.get("resolution"), **options, **own)


# validation.check_sampler_options asks the builder which of its keys a given `kind` takes
build_flow_policy.check_options = lambda node: flow_sampler(  # type: ignore[attr-defined]
    str(node.get("kind")), node.get("noise_level"), node.get("eta")
)
# validation.check_sampler_fits_model runs the checks that need no weights against the model config
build_flow_policy.check_family = check_flow_config  # type: ignore[attr-defined]

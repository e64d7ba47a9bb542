"""What both Stable-Diffusion-style policies share, written once: the member's modules, the
resolution check, prompt encoding, guidance, the denoiser call of a step, the random draws of a
rollout and decoding (the base class `SDPolicy` and the functions it uses).

lcm.py and ddim.py differ only in their schedule constants and how their UNet call is guided;
everything the two pipelines (LatentConsistencyModelPipeline, StableDiffusionPipeline) do alike
lives here, so the copies cannot drift (they did: only the DDIM policy checked the resolution).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from diffusers.utils.torch_utils import randn_tensor

from rlcm_exp.models.family import check_resolution as check_member_resolution
from rlcm_exp.models.family import check_vae_resolution
from rlcm_exp.models.hub import vae_scale
from rlcm_exp.policies.base import DenoiserInputs, Generators, Policy
from rlcm_exp.policies.conditioning import Conditioning
from rlcm_exp.rl.gaussian import gaussian_log_prob

P = TypeVar("P", bound=Policy)


@dataclass(frozen=True)
class PipelineModules:
    """The modules of a loaded diffusers pipeline that a policy drives (the first argument of
    LCMPolicy and DDIMPolicy); an SDXL pipeline adds its second text encoder and tokenizer."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None  # SDXL's second text encoder (None: SD 1.x / 2.x)
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True  # SDXL: zeros as the unconditional half


def pipeline_modules(pipe: Any) -> PipelineModules:
    """The modules a policy drives, taken from a loaded diffusers pipeline."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return PipelineModules(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    force_zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
    return PipelineModules(
        pipe.unet,
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        pipe.scheduler,
        pipe.text_encoder_2,
        pipe.tokenizer_2,
        force_zeros,
    )


def check_member_fits(member: str, family: Any, resolution: int | None) -> None:
    """The checks of a VP sampler over the family's `member` ("lcm": sampler=lcm, "diffusion":
    sampler=ddim) that read only configs: the family's process, the member, the VAE's resolution."""
    check_process = getattr(family, "check_process", None)  # a VP sampler on a flow family is refused
    if check_process is not None:
        check_process("vp", "lcm" if member == "lcm" else "ddim")
    check_member_resolution(family, member, resolution)


def from_family(
    policy_class: type[P], family: Any, device: torch.device | str, resolution: int | None, **options: Any
) -> P:
    """`policy_class` over the family's member it drives (`policy_class.member`), loaded on `device`;
    `resolution=None` uses the member's own. The builders named by conf/sampler/ call this.
    A resolution the member's VAE cannot produce is refused before its weights load."""
    member = policy_class.member
    check_member_fits(member, family, resolution)
    build = cast(Callable[..., P], policy_class)  # a concrete policy class: its own __init__, not Policy's
    pipe = family.load(member, device)
    # the member's native side: configured, read from its folder, or (a hub member first seen now)
    # from the loaded UNet's sample_size x the VAE factor
    loaded_native = int(pipe.unet.config.sample_size) * vae_scale_factor(pipe.vae)
    native = family.member(member).resolution or loaded_native
    return build(pipeline_modules(pipe), resolution=resolution or native, **options)


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent cell along a side of a loaded VAE (rlcm_exp.models.hub.vae_scale)."""
    return vae_scale(vae.config)


# Checked again on the loaded VAE by the policies: a hub member whose config was not on this machine
# could not be checked before loading (rlcm_exp.models.family.check_resolution).
check_resolution = check_vae_resolution


def tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    """Tokens as the pipelines' `encode_prompt` makes them: padded to the tokenizer's maximum length."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


@torch.no_grad()
def encode_prompts(
    tokenizer: Any, text_encoder: Any, prompts: list[str], device: torch.device
) -> torch.Tensor:
    """Text-encoder states, tokenised exactly as the pipelines' `encode_prompt` does (padded to the
    tokenizer's maximum length; an attention mask only for encoders configured to use one)."""
    tokens = tokenize(tokenizer, prompts)
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def latent_shape(batch: int, channels: int, resolution: int, vae_scale: int) -> tuple[int, int, int, int]:
    side = resolution // vae_scale
    return (batch, channels, side, side)


def initial_latents(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device,
    dtype: torch.dtype,
    init_noise_sigma: float,
) -> torch.Tensor:
    """x_T as the pipelines draw it (first draw of `generator`, in the model's dtype, scaled by the
    scheduler's init_noise_sigma), kept in float32 from then on."""
    return (randn_tensor(shape, generator=generator, device=device, dtype=dtype) * init_noise_sigma).float()


def step_noise(
    shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The latent-shaped normal a scheduler's `step` draws (model dtype, same generator), as float32."""
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype).float()


@torch.no_grad()
def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float32 images in [0, 1], (B, 3, H, W); the VAE runs in its own dtype, also when
    called under autocast (training samples inside `accelerator.autocast()`): autocast would run its
    convolutions in fp16 and undo SDXL's fp32 upcast (`prepare_vae`), overflowing to NaN images."""
    vae_dtype = next(vae.parameters()).dtype
    with torch.autocast(latents.device.type, enabled=False):
        image = vae.decode((latents / vae.config.scaling_factor).to(vae_dtype)).sample
    return (image.float() / 2 + 0.5).clamp(0, 1)


def gaussian_step_log_prob(
    policy: Any,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    step_index: torch.Tensor,
    cond: Conditioning,
) -> torch.Tensor:
    """`Policy.log_prob` of both samplers (their `log_prob` is this function): log pi_theta of the
    recorded actions under the policy's Gaussian step, at per-sample step indices (B,), with grad;
    (B,) float32, element-averaged (rl/gaussian.py)."""
    mean, std = policy.action_mean_std(latents, step_index, cond)
    return gaussian_log_prob(next_latents, mean, std)


def step_indices(step_index: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Per-sample step indices (B,) long on `device`, from a (B,) tensor or one int for the whole batch."""
    if isinstance(step_index, int):
        return torch.full((batch,), step_index, dtype=torch.long, device=device)
    return step_index.to(device=device, dtype=torch.long)


class SDText:
    """SD 1.x / 2.x conditioning: one CLIP text encoder, its states the UNet's encoder_hidden_states
    (the record's one field, "states", (B, 77, D))."""

    def __init__(self, tokenizer: Any, text_encoder: Any) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        return Conditioning({"states": encode_prompts(self.tokenizer, self.text_encoder, prompts, device)})

    def empty(self, device: torch.device) -> Conditioning:
        """The unconditional half of classifier-free guidance: the empty prompt's states."""
        return self.encode([""], device)

    def unet_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        return {"encoder_hidden_states": cond.field("states")}


class SDXLText:
    """SDXL conditioning as StableDiffusionXLPipeline computes it: both text encoders' penultimate
    hidden states concatenated ("states", (B, 77, 2048)), the second encoder's pooled projection
    ("pooled", (B, 1280), the UNet's `text_embeds`), and the added time ids (original size, crop
    (0, 0), target size) of a square `resolution`, the same for every row (so not in the record)."""

    def __init__(
        self, tokenizers: list[Any], text_encoders: list[Any], force_zeros: bool, resolution: int
    ) -> None:
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.force_zeros = force_zeros  # SDXL base: the unconditional half is zeros, not the "" prompt
        self.time_ids = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32
        )

    @torch.no_grad()
    def encode(self, prompts: list[str], device: torch.device) -> Conditioning:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenize(tokenizer, prompts).input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the pipeline keeps the last encoder's pooled projection
            states.append(out.hidden_states[-2])
        assert pooled is not None
        hidden = torch.cat(states, dim=-1).to(self.text_encoders[-1].dtype)
        return Conditioning({"states": hidden, "pooled": pooled.to(hidden.dtype)})

    def empty(self, device: torch.device) -> Conditioning:
        cond = self.encode([""], device)
        return (
            Conditioning({k: torch.zeros_like(v) for k, v in cond.fields.items()})
            if self.force_zeros
            else cond
        )

    def unet_kwargs(self, cond: Conditioning) -> dict[str, Any]:
        states = cond.field("states")
        time_ids = self.time_ids.to(device=states.device, dtype=states.dtype).expand(len(cond), -1)
        return {
            "encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": cond.field("pooled"), "time_ids": time_ids},
        }


def text_conditioning(pairs: list[tuple[Any, Any]], force_zeros: bool, resolution: int) -> SDText | SDXLText:
    """The conditioning of a policy's (tokenizer, text encoder) pairs: SDXL's when the second pair
    is present (text_encoder_2), SD's otherwise."""
    present = [(tok, enc) for tok, enc in pairs if enc is not None]
    if len(present) == 1:
        return SDText(*present[0])
    tokenizers, encoders = (list(x) for x in zip(*present, strict=True))
    return SDXLText(tokenizers, encoders, force_zeros, resolution)


def prepare_vae(vae: Any, conditioning: Any) -> None:
    """SDXL's VAE overflows in fp16: its pipeline decodes in fp32 when the config says force_upcast,
    and so do the policies (the SD pipelines do not, so an SD VAE keeps its dtype)."""
    upcast = bool(getattr(vae.config, "force_upcast", False))
    if isinstance(conditioning, SDXLText) and upcast and next(vae.parameters()).dtype == torch.float16:
        vae.to(torch.float32)


class ClassifierFreeGuidance:
    """Classifier-free guidance by batch doubling, as the Stable Diffusion pipelines do it: one UNet
    call on [empty prompt; prompt], then eps = eps_u + scale * (eps_c - eps_u). Shared by the DDIM
    policy and the LCM policy on a UNet without a guidance embedding (LCM-LoRA)."""

    def __init__(self, scale: float, text: SDText | SDXLText, device: Callable[[], torch.device]) -> None:
        self.scale = float(scale)
        self._text, self._device = text, device
        # the empty-prompt states: the text encoder is frozen, so they are computed once per device/dtype
        self._uncond: dict[tuple[torch.device, torch.dtype], Conditioning] = {}

    @property
    def enabled(self) -> bool:
        """The pipelines' rule: guidance only for scale > 1 (scale 1 is the conditional model)."""
        return self.scale > 1.0

    def uncond(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        key = (device, dtype)
        if key not in self._uncond:
            self._uncond[key] = self._text.empty(self._device()).to(device=device, dtype=dtype)
        return self._uncond[key]

    def doubled(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> DenoiserInputs:
        """(x, t, kwargs) of the doubled call: the empty prompt's half first, as diffusers orders it."""
        uncond = self.uncond(cond.device, cond.dtype).expand(x.shape[0])
        return (
            torch.cat([x, x]),
            torch.cat([t, t]),
            self._text.unet_kwargs(Conditioning.cat([uncond, cond])),
        )

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        """The guided prediction from the doubled call's output."""
        eps_u, eps_c = eps.chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


@dataclass
class RolloutStep:
    """One sampler step of a rollout: the state x, the action (the next state; None for LCM's
    deterministic final call), the action's Gaussian mean and std, and the step's estimate of the
    clean latent (DDIM's x0_hat, LCM's denoised f_theta)."""

    x: torch.Tensor
    action: torch.Tensor | None
    mean: torch.Tensor
    std: torch.Tensor
    x0_estimate: torch.Tensor


class SDPolicy:
    """The part of a Stable-Diffusion-style policy (DDIMPolicy, LCMPolicy) that does not depend on its
    sampler: the pipeline's modules and text conditioning, classifier-free guidance, the device,
    prompt encoding, decoding, the one denoiser call of a step and per-device copies of constant
    tables. A subclass calls `_init_pipeline`, sets `timesteps` (H,) and says, through `_guided` and
    `_call_kwargs`, how its UNet call is guided."""

    denoiser: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    timesteps: torch.Tensor  # (H,) the UNet timestep of each sampler step, CPU

    def _init_pipeline(self, modules: PipelineModules, resolution: int, cfg_scale: float) -> None:
        """Take the pipeline's modules; `cfg_scale` > 1: classifier-free guidance by batch doubling."""
        self.denoiser, self.vae = modules.unet, modules.vae
        self.text_encoder, self.tokenizer = modules.text_encoder, modules.tokenizer
        self.latent_channels = int(self.denoiser.config.in_channels)
        self.vae_scale = vae_scale_factor(self.vae)
        check_resolution(resolution, self.vae_scale)
        self.resolution = resolution
        pairs = [(self.tokenizer, self.text_encoder), (modules.tokenizer_2, modules.text_encoder_2)]
        self._text = text_conditioning(pairs, modules.force_zeros_for_empty_prompt, resolution)
        prepare_vae(self.vae, self._text)
        self._cfg = ClassifierFreeGuidance(cfg_scale, self._text, lambda: self.device)
        # device copies of constant tables, moved once per device rather than once per step
        self._device_copies: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text-encoder states, tokenised exactly as the member's diffusers pipeline does."""
        return self._text.encode(prompts, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode(self.vae, latents)

    def _on(self, name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`table` (a constant of the schedule, named `name`) on `device`, copied there once."""
        key = (name, device)
        if key not in self._device_copies:
            self._device_copies[key] = table.to(device)
        return self._device_copies[key]

    def _guided(self, training: bool) -> bool:
        """Whether the UNet call is one classifier-free doubled batch (the DDIM policy leaves it out of
        training without `train_cfg`)."""
        return self._cfg.enabled

    def _call_kwargs(self, batch: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """UNet keywords beside the text conditioning (an LCM's guidance embedding); none here."""
        return {}

    def denoiser_inputs(
        self, latents: torch.Tensor, step_index: torch.Tensor | int, cond: Conditioning, training: bool
    ) -> DenoiserInputs:
        """(x, t, kwargs) of the UNet call at step k (see `Policy.denoiser_inputs`): one doubled batch
        when `_guided`, the empty prompt's half first, as diffusers orders it."""
        batch, device = latents.shape[0], latents.device
        t = self._on("timesteps", self.timesteps, device)[step_indices(step_index, batch, device)]
        x = latents.to(cond.dtype)  # the UNet runs in the text encoder's dtype; the state stays float32
        if self._guided(training):
            return self._cfg.doubled(x, t, cond)
        return x, t, {**self._text.unet_kwargs(cond), **self._call_kwargs(batch, cond.dtype, device)}

    def _eps(
        self, x_t: torch.Tensor, step_index: torch.Tensor, cond: Conditioning, training: bool
    ) -> torch.Tensor:
        """eps_theta(x_t, t_k) in float32, guided as `denoiser_inputs` decides: eps_u + g * (eps_c - eps_u)."""
        x, t, kwargs = self.denoiser_inputs(x_t, step_index, cond, training)
        eps = self.denoiser(x, t, **kwargs).sample.float()
        return self._cfg.combine(eps) if self._guided(training) else eps

    def _initial_state(
        self, cond: Conditioning, generator: Generators, init_noise_sigma: float
    ) -> tuple[tuple[int, int, int, int], torch.Tensor]:
        """The latent shape of a rollout and x_T, the first draw of `generator` (`initial_latents`)."""
        shape = latent_shape(len(cond), self.latent_channels, self.resolution, self.vae_scale)
        return shape, initial_latents(shape, generator, self.device, cond.dtype, init_noise_sigma)

    # log pi_theta(next | latents), (B,) float32 with grad: the Gaussian of the subclass's `action_mean_std`
    log_prob = gaussian_step_log_prob

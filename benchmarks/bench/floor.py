"""The compute floor: the bare model calls one epoch cannot avoid, at the epoch's batch sizes.

Text encoder, UNet forwards of sampling, VAE decodes, the reward, UNet forward+backward of
training, optimizer steps, each in a plain `for` loop over inputs built beforehand. Only the
public policy surface is used (`rlcm_exp.policies.base.Policy`): `unet_inputs` gives the exact
inputs of one UNet call of a step, classifier-free doubling and guidance embedding included.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.bench.device import sync
from rlcm_exp.policies.conditioning import Conditioning


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured dense matmul rate (FLOP/s) of this device in `dtype`: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):  # ten queued products between host checks keep a GPU busy
            a @ b
        iters += 10
        sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - start)


def _stand_in_optimizer(trainer: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """An optimizer of the trainer's class and settings over copies of the LoRA weights, with gradients:
    stepping the real one would change the model the next measured epoch trains."""
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
    params = [p.detach().clone().requires_grad_(True) for p in trainer.params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    try:
        return type(inner)(params, **inner.defaults), params
    except TypeError:
        return torch.optim.Adam(params, lr=1e-4), params


class Floor:
    """The bare model calls of one epoch, at the epoch's batch sizes, with inputs built beforehand.

    Nothing of the framework runs inside the timed regions: no scheduler arithmetic, no indexing
    of trajectories, no loss, no Python loop other than the count of calls.
    """

    def __init__(self, trainer: Any, per_call: int | None = None) -> None:
        """`per_call`: trained transitions per training UNet call (default: the plan's
        `transitions_per_forward`, so the floor's calls are the epoch's own)."""
        self.trainer = trainer
        policy, plan, acc = trainer.policy, trainer.plan, trainer.accelerator
        self.policy, self.plan, self.acc = policy, plan, acc
        device = acc.device
        bs, tb = plan.sample_batch_size, plan.train_batch_size
        prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(max(bs, tb))]
        self.prompts = prompts[:bs]
        tok = policy.tokenizer(
            self.prompts,
            padding="max_length",
            max_length=policy.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        self.ids = tok.input_ids.to(device)
        with torch.no_grad(), acc.autocast():
            embeds = policy.encode_prompts(prompts)
        dtype = embeds.dtype
        side = policy.resolution // policy.vae_scale
        gen = torch.Generator(device=device).manual_seed(0)

        def noise(b: int) -> torch.Tensor:
            shape = (b, policy.latent_channels, side, side)
            return torch.randn(shape, generator=gen, device=device).to(dtype)

        self.sample_calls = plan.sampling_batches * policy.num_steps  # LCM's last call is a UNet call too
        # train.transitions_per_forward stacks that many transitions of a minibatch into one call:
        # fewer calls, each over train_batch_size x per_call (trajectory, transition) pairs
        self.per_call = plan.transitions_per_forward if per_call is None else per_call
        self.train_calls = plan.unet_training_calls * plan.transitions_per_forward // self.per_call
        # the first step's inputs; under classifier-free guidance the UNet batch is doubled in
        # sampling, and for DDPO also in the log-prob recomputation
        train_embeds = Conditioning.cat([embeds[:tb]] * self.per_call)  # the rows, per_call times over
        with torch.no_grad():
            self.sample_args = self._unet_args(noise(bs), embeds[:bs], training=False)
            self.train_args = self._unet_args(noise(tb * self.per_call), train_embeds, training=True)
        self.unet_sample_batch = self.sample_args[0].shape[0]
        self.unet_train_batch = self.train_args[0].shape[0]
        vae_dtype = next(policy.vae.parameters()).dtype
        self.vae_in = (noise(bs).float() / policy.vae.config.scaling_factor).to(vae_dtype)
        with torch.no_grad():
            self.images = (policy.vae.decode(self.vae_in).sample.float() / 2 + 0.5).clamp(0, 1)
        self.opt, self.opt_params = _stand_in_optimizer(trainer)

    def _unet_args(
        self, x: torch.Tensor, embeds: Conditioning, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return self.policy.denoiser_inputs(x, 0, embeds, training)

    def _call(self, args: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]) -> torch.Tensor:
        """The denoiser on `denoiser_inputs`, as the Policy protocol names the call: `(x, t, **kw)` for
        a UNet, `(hidden_states=x, timestep=t, **kw)` for an SD3 / FLUX transformer."""
        x, t, kw = args
        if hasattr(self.policy.denoiser.config, "down_block_types"):  # a UNet
            return self.policy.denoiser(x, t, **kw, return_dict=False)[0]
        return self.policy.denoiser(hidden_states=x, timestep=t, **kw, return_dict=False)[0]

    def _unet_forward(self) -> None:
        with torch.no_grad(), self.acc.autocast():
            self._call(self.sample_args)

    def _unet_train(self) -> None:
        with self.acc.autocast():
            out = self._call(self.train_args)
        out.float().mean().backward()

    def flops(self) -> dict[str, int]:
        """FLOPs of one sampling UNet call and one training UNet forward+backward (counted, untimed)."""
        out = {
            "unet_sample_call": count_flops(self._unet_forward),
            "unet_train_call": count_flops(self._unet_train),
        }
        self._clear_grads()
        return out

    def _clear_grads(self) -> None:
        for p in self.trainer.params:
            p.grad = None

    def _text(self) -> None:
        with torch.no_grad():
            self.policy.text_encoder(self.ids)

    def _decode(self) -> None:
        with torch.no_grad():
            self.policy.vae.decode(self.vae_in)

    def _reward(self) -> None:
        self.trainer.reward_fn(self.images, self.prompts)

    def measure(self) -> dict[str, float]:
        """Seconds of each floor component over one epoch's calls, and their total."""
        plan = self.plan
        out: dict[str, float] = {}
        components: list[tuple[str, int, Callable[[], Any]]] = [
            ("text_encoder", plan.sampling_batches, self._text),
            ("unet_sample", self.sample_calls, self._unet_forward),
            ("vae_decode", plan.sampling_batches, self._decode),
            ("reward", plan.sampling_batches, self._reward),
            ("unet_train", self.train_calls, self._unet_train),
            ("optimizer", plan.optimizer_steps_per_epoch, self.opt.step),
        ]
        for name, calls, fn in components:
            if name == "optimizer":
                self._clear_grads()  # the LoRA gradients of the fwd+bwd calls; the stand-in has its own
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            out[name] = time.perf_counter() - start
        out["total"] = sum(out.values())
        return out

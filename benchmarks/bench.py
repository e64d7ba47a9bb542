"""Phase benchmark of RLCM and DDPO, measured against the bare-model compute floor.

    python -m benchmarks.bench --scale tiny|toy|full --repeats N --out benchmarks/results

For each algorithm the production code runs unchanged: `rlcm_exp.__main__.train` composes the
project's Hydra config, builds the model family, policy, LoRA, reward and optimizer exactly as a
real run does and drives the real `Trainer`. The benchmark only swaps in a `Trainer` subclass
whose `__init__` wraps a few bound methods with timers (policy.encode_prompts / sample / decode /
log_prob, accelerator.backward / clip_grad_norm_, optimizer.step, ...) and whose `run_epoch`
times the whole epoch and then, in the same process and at the same batch sizes, the bare model
calls that epoch cannot avoid (the *floor*): text encoder, UNet forwards of sampling, VAE
decodes, the reward, UNet forward+backward of training, optimizer steps. `overhead = epoch /
floor` per repeat; median and spread are reported.

Each algorithm runs in its own subprocess, so its peak memory and allocator state are its own.
Results: `OUT/{scale}-{device}.json` (everything, raw per-repeat numbers included) and
`OUT/{scale}-{device}.md` (the table). See benchmarks/README.md for how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the benchmark never downloads anything
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ALGOS = ("rlcm", "ddpo")
SCHEMA = 1


# ----------------------------------------------------------------------------- settings per scale


@dataclasses.dataclass(frozen=True)
class Scale:
    """One benchmark size. RLCM and DDPO share every batch setting; each keeps its paper's sampler."""

    model: list[str]  # Hydra overrides choosing the model family and task
    samples_per_epoch: int
    sample_batch_size: int
    train_batch_size: int
    samples_per_step: int
    rlcm_steps: int = 8  # the paper's RLCM horizon
    ddpo_steps: int = 50  # DDPO's DDIM steps, with classifier-free guidance (batch doubling)
    warmup: int = 1  # epochs run first and not measured (allocator, oneDNN primitives, first image grid)


SCALES: dict[str, Scale] = {
    # random ~0.1M-parameter UNets at 8x8 latents: Python dominates, reported without a target
    "tiny": Scale(["model=tiny", "task=compression"], 16, 8, 4, 16),
    # the toy world's trained ~1M-parameter UNets at 8x8 latents (32 px): target overhead <= 1.05 on a CPU.
    # 32 trajectories in 4 sampling batches of 8, one optimizer step per epoch over minibatches of 4
    "toy": Scale(["model=toy", "task=toy_compression"], 32, 8, 4, 32),
    # SD-1.5-sized UNet/VAE/text encoder with random weights at the paper's resolutions (GPU); on a
    # CPU `_full_cpu` shrinks it to one trajectory and one trained transition
    "full": Scale(["model=dreamshaper_v7", "task=compression"], 16, 8, 2, 16, warmup=1),
}


def _full_cpu(scale: Scale) -> Scale:
    return dataclasses.replace(
        scale, samples_per_epoch=1, sample_batch_size=1, train_batch_size=1, samples_per_step=1, warmup=0
    )


def algo_overrides(scale: Scale, algo: str) -> list[str]:
    steps = scale.rlcm_steps if algo == "rlcm" else scale.ddpo_steps
    return [
        *scale.model,
        f"algo={algo}",
        f"sampler.num_steps={steps}",
        "logger=none",
        "train.eval_every=0",
        f"train.samples_per_epoch={scale.samples_per_epoch}",
        f"train.sample_batch_size={scale.sample_batch_size}",
        f"train.train_batch_size={scale.train_batch_size}",
        f"train.samples_per_step={scale.samples_per_step}",
        "train.inner_epochs=1",
    ]


# ----------------------------------------------------------------------------- timing helpers


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


class PhaseClock:
    """Seconds per named phase, accumulated by wrapped callables.

    On a GPU a wrapped call records CUDA events instead of synchronising, so the instrumented
    epoch keeps its asynchrony; the events are resolved once, at the end of the epoch. Host-side
    phases (advantages, logging) are always wall-clock.
    """

    HOST = {"advantages", "logging"}

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, Any, Any]] = []

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        use_events = _cuda() and name not in self.HOST

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if use_events:
                start_ev = torch.cuda.Event(enable_timing=True)
                start_ev.record()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - start
                if use_events:
                    end_ev = torch.cuda.Event(enable_timing=True)
                    end_ev.record()
                    self.events.append((name, start_ev, end_ev))

        return timed

    def take(self) -> dict[str, float]:
        """This epoch's seconds per phase; resets the clock."""
        out = dict(self.wall)
        if self.events:
            _sync()
            gpu: dict[str, float] = defaultdict(float)
            for name, s, e in self.events:
                gpu[name] += s.elapsed_time(e) / 1000.0
            out.update(gpu)
        self.wall, self.events = defaultdict(float), []
        return out


def _wrap_attr(obj: Any, attr: str, clock: PhaseClock, name: str) -> None:
    # an instance attribute shadows the class's method: the production code calls self.<attr>(...)
    setattr(obj, attr, clock.wrap(name, getattr(obj, attr)))


def reset_peak_memory() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()
    else:
        # Linux >= 4.0: "5" resets VmHWM (peak RSS) of this process to its current RSS
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory() -> dict[str, Any]:
    if _cuda():
        return {"kind": "cuda_max_allocated", "bytes": int(torch.cuda.max_memory_allocated())}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"kind": "rss_peak", "bytes": int(line.split()[1]) * 1024}
    except OSError:
        pass
    # fallback: the process's lifetime peak (kB on Linux, bytes on macOS)
    scale = 1 if sys.platform == "darwin" else 1024
    return {
        "kind": "rss_peak_process",
        "bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale,
    }


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured dense matmul rate (FLOP/s) of this device in `dtype`: the denominator of MFU."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):  # ten queued products between host checks keep a GPU busy
            a @ b
        iters += 10
        _sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - start)


@contextmanager
def count_cuda_syncs(enabled: bool) -> Iterator[list[str] | None]:
    """On a GPU, the host-device synchronisations of the block (torch's sync debug mode), else None.

    Used on the warm-up epoch only: the check itself slows what it watches. A hot path with no
    synchronisation inside its step loops shows a count that grows with batches and optimizer
    steps, not with steps x minibatches.
    """
    if not (enabled and _cuda()):
        yield None
        return
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower())


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- the floor


def _policy_kind(policy: Any) -> str:
    from rlcm_exp.policies.ddim import DDIMPolicy
    from rlcm_exp.policies.lcm import LCMPolicy

    if isinstance(policy, LCMPolicy):
        return "lcm"
    if isinstance(policy, DDIMPolicy):
        return "ddim"
    raise TypeError(f"unknown policy type {type(policy).__name__}")


class Floor:
    """The bare model calls of one epoch, at the epoch's batch sizes, with inputs built beforehand.

    Nothing of the framework runs inside the timed regions: no scheduler arithmetic, no indexing
    of trajectories, no loss, no Python loop other than the count of calls.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        policy, plan, acc = trainer.policy, trainer.plan, trainer.accelerator
        self.policy, self.plan, self.acc = policy, plan, acc
        self.kind = _policy_kind(policy)
        device = acc.device
        bs, tb = plan.sample_batch_size, plan.train_batch_size
        n = max(bs, tb)
        prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(n)]
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
            return torch.randn((b, policy.latent_channels, side, side), generator=gen, device=device).to(
                dtype
            )

        # classifier-free guidance doubles the UNet batch; DDPO also doubles it when recomputing log-probs
        cfg_sample = self.kind == "ddim" and policy.use_cfg
        cfg_train = cfg_sample and policy.train_cfg
        self.sample_calls = plan.sampling_batches * policy.num_steps  # LCM's last call is a UNet call too
        self.train_calls = plan.minibatches_per_inner_epoch * plan.trained_transitions * plan.inner_epochs
        self.sample_args = self._unet_args(noise(bs), embeds[:bs], cfg_sample, device, dtype)
        self.train_args = self._unet_args(noise(tb), embeds[:tb], cfg_train, device, dtype)
        self.unet_sample_batch = self.sample_args[0].shape[0]
        self.unet_train_batch = self.train_args[0].shape[0]
        vae_dtype = next(policy.vae.parameters()).dtype
        self.vae_in = (noise(bs).float() / policy.vae.config.scaling_factor).to(vae_dtype)
        with torch.no_grad():
            self.images = (policy.vae.decode(self.vae_in).sample.float() / 2 + 0.5).clamp(0, 1)
        # a stand-in optimizer of the same class and settings over copies of the LoRA weights:
        # stepping the real one would change the model the next measured epoch trains
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        self.opt_params = [p.detach().clone().requires_grad_(True) for p in trainer.params]
        for p in self.opt_params:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            self.opt = type(inner)(self.opt_params, **inner.defaults)
        except TypeError:
            self.opt = torch.optim.Adam(self.opt_params, lr=1e-4)

    def _unet_args(
        self, x: torch.Tensor, embeds: torch.Tensor, cfg: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        policy, b = self.policy, x.shape[0]
        t = policy.timesteps[:1].to(device).expand(b).contiguous()
        kwargs: dict[str, torch.Tensor] = {"encoder_hidden_states": embeds}
        if self.kind == "lcm":
            kwargs["timestep_cond"] = policy._w_embedding(b, dtype)
        elif cfg:
            uncond = policy._uncond_embeds(device, dtype).expand(b, -1, -1)
            x, t = torch.cat([x, x]), torch.cat([t, t])
            kwargs["encoder_hidden_states"] = torch.cat([uncond, embeds])
        return x, t, kwargs

    def _unet_forward(self) -> None:
        x, t, kw = self.sample_args
        with torch.no_grad(), self.acc.autocast():
            self.policy.unet(x, t, **kw)

    def _unet_train(self) -> None:
        x, t, kw = self.train_args
        with self.acc.autocast():
            out = self.policy.unet(x, t, **kw).sample
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

    def measure(self) -> dict[str, float]:
        policy, plan = self.policy, self.plan
        out: dict[str, float] = {}

        def timed(name: str, calls: int, fn: Callable[[], Any]) -> None:
            _sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync()
            out[name] = time.perf_counter() - start

        def text() -> None:
            with torch.no_grad():
                policy.text_encoder(self.ids)

        def decode() -> None:
            with torch.no_grad():
                policy.vae.decode(self.vae_in)

        timed("text_encoder", plan.sampling_batches, text)
        timed("unet_sample", self.sample_calls, self._unet_forward)
        timed("vae_decode", plan.sampling_batches, decode)
        timed("reward", plan.sampling_batches, lambda: self.trainer.reward_fn(self.images, self.prompts))
        timed("unet_train", self.train_calls, self._unet_train)
        self._clear_grads()
        timed("optimizer", plan.optimizer_steps_per_epoch, self.opt.step)
        out["total"] = sum(out.values())
        return out


# ----------------------------------------------------------------------------- the instrumented trainer


@dataclasses.dataclass
class Collected:
    epochs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    floors: list[dict[str, float]] = dataclasses.field(default_factory=list)
    flops: dict[str, int] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_s: float | None = None  # the final LoRA save
    checkpoints_s: list[float] = dataclasses.field(default_factory=list)  # full training-state checkpoints


def make_trainer_class(base: type, warmup: int, collected: Collected) -> type:
    """A Trainer whose epoch is the production epoch, timed by phase, each followed by a floor pass."""

    class BenchTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # only the warm-up epoch 0 saves the image grid, as in a long run where only the first
            # and last of ~100 epochs do
            self.settings = dataclasses.replace(self.settings, epochs=1 << 30)
            self.clock = clock = PhaseClock()
            p, acc = self.policy, self.accelerator
            for attr, name in [
                ("encode_prompts", "text_encode"),
                ("sample", "sample_total"),
                ("decode", "vae_decode"),
                ("log_prob", "logprob_forward"),
            ]:
                _wrap_attr(p, attr, clock, name)
            _wrap_attr(acc, "backward", clock, "backward")
            _wrap_attr(acc, "clip_grad_norm_", clock, "optimizer")
            for attr in ("step", "zero_grad"):
                _wrap_attr(self.optimizer, attr, clock, "optimizer")
            # not lr_scheduler.step: its state_dict pickles the instance __dict__, wrapper included;
            # a LinearLR step is a few multiplications and lands in "other"
            _wrap_attr(self, "advantages", clock, "advantages")
            _wrap_attr(self, "maybe_save_images", clock, "logging")
            _wrap_attr(self.metrics, "write", clock, "logging")
            self.floor: Floor | None = None
            self.logger_wrapped = False
            if hasattr(self, "save_checkpoint"):  # full checkpoints are written by the entry point's loop
                self.save_checkpoint = self._timed_checkpoint(self.save_checkpoint)

        def _timed_checkpoint(self, fn: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                _sync()
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    collected.checkpoints_s.append(time.perf_counter() - start)

            return timed

        def run_epoch(self, epoch: int) -> dict[str, Any]:
            measured = epoch >= warmup
            # the entry point attaches the logger after __init__
            if not self.logger_wrapped and self.logger is not None:
                _wrap_attr(self.logger, "log", self.clock, "logging")
                self.logger_wrapped = True
            self.clock.take()
            gc.collect()
            reset_peak_memory()
            _sync()
            start = time.perf_counter()
            with count_cuda_syncs(enabled=not measured) as syncs:
                record = super().run_epoch(epoch)
            _sync()
            wall = time.perf_counter() - start
            if syncs is not None:
                collected.info["cuda_syncs_warmup_epoch"] = len(syncs)
            mem = peak_memory()
            phases = self.clock.take()
            label = "measured" if measured else "warm-up"
            print(f"[bench] {collected.info.get('algo')} epoch {epoch} ({label}): {wall:.2f} s", flush=True)
            if self.floor is None:
                self.floor = Floor(self)
                collected.flops = self.floor.flops()
            if not measured:
                return record
            floor = self.floor.measure()
            print(f"[bench] {collected.info.get('algo')} floor: {floor['total']:.2f} s", flush=True)
            collected.epochs.append(self._split(record, phases, wall, mem))
            collected.floors.append(floor)
            return record

        def _split(
            self, record: dict[str, Any], ph: dict[str, float], wall: float, mem: dict[str, Any]
        ) -> dict[str, Any]:
            sample_total = ph.get("sample_total", record["time_sample_s"])
            text, decode = ph.get("text_encode", 0.0), ph.get("vae_decode", 0.0)
            phases = {
                "text_encode": text,
                "sampling": max(sample_total - text - decode, 0.0),  # the UNet step loop
                "vae_decode": decode,
                "reward_wait": record.get("time_reward_wait_s", 0.0),  # reward not hidden behind sampling
                "advantages": ph.get("advantages", 0.0),
                "logprob_forward": ph.get("logprob_forward", 0.0),
                "backward": ph.get("backward", 0.0),
                "optimizer": ph.get("optimizer", 0.0),
                "logging": ph.get("logging", 0.0),
            }
            # the remainder: loop code between the model calls (indexing, loss, tqdm, stats)
            phases["other"] = max(wall - sum(phases.values()), 0.0)
            if self.trainer_reward_inline():
                phases["reward_wait"] = record.get("time_reward_s", 0.0)
                phases["other"] = max(wall - sum(v for k, v in phases.items() if k != "other"), 0.0)
            return {
                "epoch_s": wall,
                "phases": phases,
                "reward_s": record.get("time_reward_s", 0.0),  # total scoring time, overlapped with sampling
                "sample_total_s": sample_total,
                "train_s": record.get("time_train_s", 0.0),
                "images_per_s": self.plan.samples_per_process / sample_total if sample_total > 0 else None,
                "rollout_s": sample_total / self.plan.sampling_batches,
                "peak_memory": mem,
            }

        def trainer_reward_inline(self) -> bool:
            return self.pool is None  # reward_workers=0: scored inline, inside the sampling loop's wall

    return BenchTrainer


def run_algo(
    scale_name: str,
    algo: str,
    repeats: int,
    warmup: int | None,
    extra: list[str],
    full_dir: str | None,
    full_downscale: int,
) -> dict[str, Any]:
    """Run `warmup + repeats` production epochs of one algorithm in this process; raw measurements."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import rlcm_exp.__main__ as entry

    scale = SCALES[scale_name]
    notes: list[str] = []
    overrides = algo_overrides(scale, algo)
    if scale_name == "full":
        overrides, scale, notes = _full_overrides(scale, algo, overrides, full_dir, full_downscale)
    warm = scale.warmup if warmup is None else warmup
    overrides += [f"train.epochs={warm + repeats}", *extra]
    if _cuda():
        overrides += ["mixed_precision=bf16"]  # the MFU denominator is the bf16 matmul rate
    else:
        overrides += ["device=cpu"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)

    collected = Collected(info={"algo": algo, "overrides": overrides, "notes": notes})
    original_trainer, original_save = entry.Trainer, entry.save_lora

    def timed_save(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_save(*args, **kwargs)
        finally:
            collected.checkpoint_s = time.perf_counter() - start

    entry.Trainer = make_trainer_class(original_trainer, warm, collected)
    entry.save_lora = timed_save
    try:
        with tempfile.TemporaryDirectory(prefix=f"bench-{algo}-") as run_dir:
            entry.train(cfg, Path(run_dir))
            plan = json.loads((Path(run_dir) / "batch_plan.json").read_text())
    finally:
        entry.Trainer, entry.save_lora = original_trainer, original_save
    device = torch.device("cuda" if _cuda() else "cpu")
    peak_dtype = torch.bfloat16 if _cuda() else torch.float32
    return {
        "algo": algo,
        "overrides": overrides,
        "notes": notes,
        "sampler": {
            k: v
            for k, v in OmegaConf.to_container(cfg.sampler, resolve=True).items()  # type: ignore[union-attr]
            if not str(k).startswith("_")
        },
        "batch_plan": plan,
        "warmup_epochs": warm,
        "epochs": collected.epochs,
        "floors": collected.floors,
        "flops": collected.flops,
        "matmul_peak": {
            "dtype": str(peak_dtype).removeprefix("torch."),
            "flops_per_s": matmul_peak_flops(device, peak_dtype),
        },
        "cuda_syncs_warmup_epoch": collected.info.get("cuda_syncs_warmup_epoch"),
        "checkpoint_s": collected.checkpoint_s,
        "full_checkpoints_s": collected.checkpoints_s,
        "checkpoint_every": int(cfg.train.get("checkpoint_every", 0) or 0),
        "torch_threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- full-size models


SD15_UNET: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# SimianLuo/LCM_Dreamshaper_v7: the same UNet with a guidance-embedding input, native 768 px
LCM_UNET_EXTRA: dict[str, Any] = {"time_cond_proj_dim": 256, "sample_size": 96}
SD15_VAE: dict[str, Any] = {  # vae/config.json
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {  # openai/clip-vit-large-patch14 text tower, as SD-1.5 ships it
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
}
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
FULL_WORDS = ["a", "an", "the", "of", "in", "on", "with", "photo", "animal", "dog", "cat", "bird", "fish"]


def build_full_member(root: Path, kind: str) -> Path:
    """Write an SD-1.5-shaped pipeline with random weights (fp16 on disk) in the hub layout; return its folder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from rlcm_exp.tokenizer import write_clip_tokenizer

    folder = root / kind
    if (folder / "model_index.json").is_file():
        return folder
    tok_dir = write_clip_tokenizer(root / f"_tokenizer_{kind}", FULL_WORDS, model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **SD15_TEXT,
        )
    )
    vae = AutoencoderKL(**SD15_VAE)
    common = {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if kind == "lcm":
        unet = UNet2DConditionModel(**{**SD15_UNET, **LCM_UNET_EXTRA})
        sched = LCMScheduler(
            **SD_SCHEDULE,
            original_inference_steps=50,
            timestep_scaling=10.0,
            set_alpha_to_one=True,
            steps_offset=1,
            clip_sample=False,
        )
        pipe: Any = LatentConsistencyModelPipeline(unet=unet, scheduler=sched, **common)
    else:
        unet = UNet2DConditionModel(**SD15_UNET)
        sched = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(unet=unet, scheduler=sched, **common)
    # fp16 on disk halves the write and the read; the loader casts to model.dtype
    pipe.to(torch.float16)
    tmp = root / f".{kind}.tmp"
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_clip_tokenizer(
        tmp / "tokenizer", FULL_WORDS, model_max_length=77
    )  # transformers 5 omits the slow files
    shutil.rmtree(tok_dir)
    tmp.rename(folder)
    del pipe, unet, vae, text_encoder
    gc.collect()
    return folder


def _full_overrides(
    scale: Scale, algo: str, overrides: list[str], full_dir: str | None, downscale: int
) -> tuple[list[str], Scale, list[str]]:
    kind = "lcm" if algo == "rlcm" else "diffusion"
    root = Path(full_dir or tempfile.mkdtemp(prefix="bench-full-"))
    folder = build_full_member(root, kind)
    native = 768 if algo == "rlcm" else 512  # the paper's resolutions
    notes = []
    if _cuda():
        resolution, dtype = native, "bfloat16"
    else:
        scale = _full_cpu(scale)
        resolution, dtype = native // downscale, "float32"
        notes.append(
            f"CPU: batch 1, one sampling batch, one trained transition, resolution {resolution} px "
            f"(the paper's {native} / {downscale}; the paper's sizes take hours per epoch on a CPU)"
        )
        overrides = algo_overrides(scale, algo)
    # one trained transition on a CPU: the path is exercised, the hours of DDPO's 50 are not spent
    fraction = "1.0" if _cuda() else ("0.15" if algo == "rlcm" else "0.02")
    overrides = [
        *overrides,
        f"model.{kind}.local_path={folder}",
        f"model.dtype={dtype}",
        f"sampler.resolution={resolution}",
        f"algo.timestep_fraction={fraction}",
    ]
    return overrides, scale, notes


# ----------------------------------------------------------------------------- summary and output


def spread(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians and spreads over repeats; overhead is taken per repeat (epoch i / floor i), then summarised."""
    floors = raw["floors"]
    # the full checkpoint written every `checkpoint_every` epochs is part of what an epoch costs:
    # its time per save, amortised, is added to each epoch as one more phase
    saves = raw.get("full_checkpoints_s") or []
    every = raw.get("checkpoint_every", 0)
    amortised = statistics.median(saves) / every if saves and every > 0 else 0.0
    epochs = [
        {**e, "epoch_s": e["epoch_s"] + amortised, "phases": {**e["phases"], "checkpoint": amortised}}
        for e in raw["epochs"]
    ]
    phases = {k: spread([e["phases"][k] for e in epochs]) for k in epochs[0]["phases"]} if epochs else {}
    floor = {k: spread([f[k] for f in floors]) for k in floors[0]} if floors else {}
    flops, plan = raw["flops"], raw["batch_plan"]
    peak = raw["matmul_peak"]["flops_per_s"]
    train_calls = plan["minibatches_per_inner_epoch"] * plan["trained_transitions"] * plan["inner_epochs"]
    sample_calls = plan["sampling_batches"] * int(raw["sampler"].get("num_steps", 0))
    train_s = [e["phases"]["logprob_forward"] + e["phases"]["backward"] for e in epochs]
    sample_s = [e["phases"]["sampling"] for e in epochs]
    mfu = {
        "peak_dtype": raw["matmul_peak"]["dtype"],
        "peak_flops_per_s": peak,
        "train": spread([flops.get("unet_train_call", 0) * train_calls / s / peak for s in train_s if s > 0]),
        "sampling": spread(
            [flops.get("unet_sample_call", 0) * sample_calls / s / peak for s in sample_s if s > 0]
        ),
        "train_floor": spread(
            [
                flops.get("unet_train_call", 0) * train_calls / f["unet_train"] / peak
                for f in floors
                if f["unet_train"] > 0
            ]
        ),
    }
    mems = [e["peak_memory"] for e in epochs]
    return {
        "algo": raw["algo"],
        "sampler": raw["sampler"],
        "batch_plan": plan,
        "notes": raw["notes"],
        "epoch_s": spread([e["epoch_s"] for e in epochs]),
        "floor_s": spread([f["total"] for f in floors]),
        "overhead": spread([e["epoch_s"] / f["total"] for e, f in zip(epochs, floors, strict=True)]),
        "phases": phases,
        "floor": floor,
        "reward_s": spread([e["reward_s"] for e in epochs]),
        "rollout_s": spread([e["rollout_s"] for e in epochs]),
        "images_per_s": spread([e["images_per_s"] for e in epochs]),
        "peak_memory": {
            "kind": mems[0]["kind"] if mems else "none",
            "bytes": max((m["bytes"] for m in mems), default=0),
        },
        "checkpoint_s": raw["checkpoint_s"],
        "cuda_syncs_warmup_epoch": raw.get("cuda_syncs_warmup_epoch"),
        "checkpoint_full_s": spread(saves),
        "checkpoint_every": every,
        "flops": flops,
        "mfu": mfu,
        "raw": {
            "epochs": epochs,
            "floors": floors,
            "overrides": raw["overrides"],
            "warmup_epochs": raw["warmup_epochs"],
            "torch_threads": raw["torch_threads"],
        },
    }


def environment() -> dict[str, Any]:
    import accelerate
    import diffusers
    import numpy
    import peft
    import transformers

    from rlcm_exp.__main__ import git_commit

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    device: dict[str, Any] = {"type": "cuda" if _cuda() else "cpu"}
    if _cuda():
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cpu_count": os.cpu_count(),
            "memory_bytes": mem,
            "load_average_at_start": os.getloadavg(),
            "hostname": platform.node(),
        },
        "device": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "accelerate": accelerate.__version__,
            "peft": peft.__version__,
            "numpy": numpy.__version__,
            "rlcm_exp_commit": git_commit(),
        },
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")},
    }


PHASE_ROWS = [  # (epoch phase, the floor component it is compared with, label)
    ("text_encode", "text_encoder", "text encoder (+ tokenise)"),
    ("sampling", "unet_sample", "sampling: UNet step loop"),
    ("vae_decode", "vae_decode", "VAE decode"),
    ("reward_wait", "reward", "reward wait (scored in a thread while sampling)"),
    ("advantages", None, "advantages (gather, per-prompt stats)"),
    ("logprob_forward", "unet_train", "log-prob recomputation, forward (floor: UNet fwd+bwd)"),
    ("backward", None, "log-prob recomputation, backward"),
    ("optimizer", "optimizer", "optimizer (clip, step, LR, zero_grad)"),
    ("logging", None, "logging (metrics, image grid)"),
    ("checkpoint", None, "checkpoint (full state, amortised per epoch)"),
    ("other", None, "other loop code"),
]


def _fmt(s: dict[str, float], unit: str = "", digits: int = 3) -> str:
    if not s or s.get("n", 0) == 0 or s["median"] != s["median"]:
        return "-"
    med = f"{s['median']:.{digits}f}{unit}"
    return med if s["n"] < 2 else f"{med} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def render_markdown(report: dict[str, Any]) -> str:
    env, algos = report["environment"], report["algos"]
    names = [a for a in ALGOS if a in algos]
    dev = env["device"]
    device = (
        dev.get("name", "CPU")
        if dev["type"] == "cuda"
        else f"CPU ({env['machine']['cpu']}, {env['machine']['cpu_count']} cores)"
    )
    v = env["versions"]
    first = algos[names[0]]
    plan = first["batch_plan"]
    lines = [
        f"### `--scale {report['scale']}` on {device}",
        "",
        f"{report['created_utc']}; torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
        f"accelerate {v['accelerate']}, peft {v['peft']}, Python {v['python']}; torch threads "
        f"{first['raw']['torch_threads']}; load average at start {env['machine']['load_average_at_start'][0]:.2f}; "
        f"commit {v['rlcm_exp_commit'][:12]}.",
        "",
        f"Same settings for both: {plan['samples_per_epoch']} trajectories/epoch in {plan['sampling_batches']} "
        f"sampling batch(es) of {plan['sample_batch_size']}, training minibatches of {plan['train_batch_size']}, "
        f"{plan['optimizer_steps_per_epoch']} optimizer step(s)/epoch. "
        + "; ".join(
            f"{a.upper()}: {algos[a]['sampler'].get('num_steps')} steps"
            + (f", CFG {algos[a]['sampler'].get('guidance_scale')}" if a == "ddpo" else "")
            + f", {algos[a]['batch_plan']['trained_transitions']} trained transitions/trajectory"
            for a in names
        )
        + f". {report['repeats']} measured epoch(s) after {first['raw']['warmup_epochs']} warm-up; "
        "median [min-max] seconds per epoch.",
        "",
    ]
    for a in names:
        lines += [f"- {a.upper()} note: {n}" for n in algos[a]["notes"]]
    load = env["machine"]["load_average_at_start"][0]
    if dev["type"] == "cpu" and load > 0.5:
        lines.append(
            f"- **warning**: load average {load:.2f} at start; other processes shared the CPU, "
            "so the times are inflated and noisy."
        )
    header = "| phase | " + " | ".join(f"{a.upper()} | {a.upper()} floor" for a in names) + " |"
    lines += ["", header, "|---" * (1 + 2 * len(names)) + "|"]
    for phase, floor_key, label in PHASE_ROWS:
        cells = []
        for a in names:
            cells.append(_fmt(algos[a]["phases"].get(phase, {})))
            fl = algos[a]["floor"].get(floor_key, {}) if floor_key else {}
            cells.append(_fmt(fl) if floor_key else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    rows = [
        ("**epoch**", lambda s: _fmt(s["epoch_s"]), lambda s: _fmt(s["floor_s"])),
        ("**overhead = epoch / floor**", lambda s: _fmt(s["overhead"], digits=3), lambda s: ""),
        ("reward scoring, total (overlapped)", lambda s: _fmt(s["reward_s"]), lambda s: ""),
        ("rollout s per sampling batch", lambda s: _fmt(s["rollout_s"]), lambda s: ""),
        ("sampling images/s", lambda s: _fmt(s["images_per_s"], digits=2), lambda s: ""),
        (
            "peak memory (" + first["peak_memory"]["kind"] + ")",
            lambda s: f"{s['peak_memory']['bytes'] / 2**20:.0f} MiB",
            lambda s: "",
        ),
        (
            "checkpoint, full state, s per save (every N epochs)",
            lambda s: _fmt(s["checkpoint_full_s"]) + f" (N={s['checkpoint_every']})",
            lambda s: "",
        ),
        (
            "final LoRA save, once per run",
            lambda s: f"{s['checkpoint_s']:.3f}" if s["checkpoint_s"] is not None else "-",
            lambda s: "",
        ),
        (
            "MFU, training fwd+bwd (peak " + first["mfu"]["peak_dtype"] + " matmul)",
            lambda s: _fmt(s["mfu"]["train"], digits=4),
            lambda s: _fmt(s["mfu"]["train_floor"], digits=4),
        ),
    ]
    if dev["type"] == "cuda":
        rows.append(
            (
                "host-device syncs in the warm-up epoch",
                lambda s: str(s["cuda_syncs_warmup_epoch"]),
                lambda s: "",
            )
        )
    for label, main, fl in rows:
        lines.append(f"| {label} | " + " | ".join(f"{main(algos[a])} | {fl(algos[a])}" for a in names) + " |")
    comp = report.get("comparison", {})
    if comp:
        lines += [
            "",
            f"RLCM:DDPO rollout time per sampling batch = 1:{1 / comp['rollout_ratio_rlcm_to_ddpo']:.2f} "
            f"({comp['rollout_ratio_rlcm_to_ddpo']:.3f}); epoch time 1:{1 / comp['epoch_ratio_rlcm_to_ddpo']:.2f}. "
            f"Measured matmul peak: {first['mfu']['peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"({first['mfu']['peak_dtype']}).",
        ]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, scale: str, table: str) -> None:
    """Replace the block between the scale's markers in the README (appended when absent)."""
    start, end = f"<!-- bench:{scale}:start -->", f"<!-- bench:{scale}:end -->"
    text = readme.read_text() if readme.is_file() else ""
    block = f"{start}\n{table}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="toy")
    ap.add_argument(
        "--repeats", type=int, default=3, help="measured epochs per algorithm (after the warm-up)"
    )
    ap.add_argument("--warmup", type=int, default=None, help="unmeasured epochs first (default: the scale's)")
    ap.add_argument("--algos", default="rlcm,ddpo", help="comma-separated subset of rlcm,ddpo")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--readme", default=None, help="also write the table into this README between markers")
    ap.add_argument("--full-downscale", type=int, default=4, help="CPU only: full-scale resolution divisor")
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        help="a Hydra override applied to every algorithm (repeatable), e.g. --set sampler.num_steps=4",
    )
    ap.add_argument("--only", choices=ALGOS, help=argparse.SUPPRESS)  # child mode: one algorithm
    ap.add_argument("--raw-out", help=argparse.SUPPRESS)
    ap.add_argument("--full-dir", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _child(args: argparse.Namespace) -> int:
    raw = run_algo(
        args.scale, args.only, args.repeats, args.warmup, args.extra, args.full_dir, args.full_downscale
    )
    Path(args.raw_out).write_text(json.dumps(raw))
    return 0


@contextmanager
def _scratch(scale: str) -> Iterator[str | None]:
    if scale != "full":
        yield None
        return
    folder = tempfile.mkdtemp(prefix="bench-full-")  # GBs of random weights: removed afterwards
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only:
        return _child(args)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if unknown := sorted(set(algos) - set(ALGOS)):
        print(f"error: --algos: unknown {unknown}; choose from {list(ALGOS)}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print("error: --repeats must be at least 1", file=sys.stderr)
        return 2
    if args.scale == "toy" and not any(e.startswith("model.weights_dir=") for e in args.extra):
        from rlcm_exp.models import TOY_WEIGHTS

        if not (TOY_WEIGHTS / "lcm" / "model_index.json").is_file():
            print(
                f"error: --scale toy needs the toy weights in {TOY_WEIGHTS} (lcm/ and diffusion/); build them "
                "with `make toy-model`, or run --scale tiny.",
                file=sys.stderr,
            )
            return 2
    # a SIGTERM unwinds like an exception, so the GBs of full-scale scratch weights are removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = environment()  # before any model runs: the load average says whether the CPU was free
    started = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "scale": args.scale,
        "repeats": args.repeats,
        "created_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": env,
        "algos": {},
    }
    with _scratch(args.scale) as full_dir, tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        for algo in algos:
            raw_path = Path(tmp) / f"{algo}.json"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench",
                "--scale",
                args.scale,
                "--repeats",
                str(args.repeats),
                "--only",
                algo,
                "--raw-out",
                str(raw_path),
                "--full-downscale",
                str(args.full_downscale),
            ]
            cmd += ["--warmup", str(args.warmup)] if args.warmup is not None else []
            cmd += ["--full-dir", full_dir] if full_dir else []
            for e in args.extra:
                cmd += ["--set", e]
            print(f"[bench] {algo}: {' '.join(cmd[2:])}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": _pythonpath()})
            if proc.returncode != 0:
                print(f"error: the {algo} benchmark failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
            report["algos"][algo] = summarize(json.loads(raw_path.read_text()))
    if "rlcm" in report["algos"] and "ddpo" in report["algos"]:
        r, d = report["algos"]["rlcm"], report["algos"]["ddpo"]
        report["comparison"] = {
            "rollout_ratio_rlcm_to_ddpo": r["rollout_s"]["median"] / d["rollout_s"]["median"],
            "epoch_ratio_rlcm_to_ddpo": r["epoch_s"]["median"] / d["epoch_s"]["median"],
        }
    report["bench_wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.scale}-{env['device']['type']}"
    table = render_markdown(report)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    if args.readme:
        update_readme(Path(args.readme), stem, table)
    print(table)
    print(f"[bench] wrote {out / stem}.json and .md in {report['bench_wall_s']:.0f} s")
    return 0


def _pythonpath() -> str:
    # the child imports `benchmarks` from the repo root whatever the caller's working directory
    parts = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return os.pathsep.join(parts)


if __name__ == "__main__":
    sys.exit(main())

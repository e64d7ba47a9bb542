"""What the first CUDA run would otherwise find (issue 29), checked on the CPU: a compiled UNet's LoRA,
the VAE under autocast, the precision combinations, the launcher's precision, in-process runs with
two precisions, TF32, and the dtype the weights load in."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.heldout import evaluate_policy
from rlcm_exp.models.family import ModelFamily, tiny_sdxl_family
from rlcm_exp.models.lora import attach_lora, load_lora_into, save_lora
from rlcm_exp.models.precision import LAUNCHER_ENV, load_dtype, resolve_precision
from rlcm_exp.policies.lcm import build_lcm_policy
from rlcm_exp.rewards.base import score_images

CONF = Path(__file__).resolve().parents[1] / "conf"
LORA = dict(rank=2, alpha=2, init="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def lora_unet(family: ModelFamily):  # noqa: ANN201
    unet = family.load("lcm").unet
    params = attach_lora(unet, **LORA)
    return unet, params


# ---------------------------------------------------------------- 1: memory.compile_unet's LoRA


@pytest.mark.slow  # 12-15 s: importing torch.compile's machinery (nothing compiles)
def test_a_compiled_unets_lora_loads_into_an_uncompiled_unet(tiny_family, tmp_path) -> None:
    unet, params = lora_unet(tiny_family)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    compiled = torch.compile(unet)  # the wrapper memory.compile_unet puts on; nothing compiles until called
    assert any("_orig_mod." in k for k in compiled.state_dict())
    folder = save_lora(compiled, tmp_path / "final")
    saved = load_file(folder / "pytorch_lora_weights.safetensors")
    assert saved and not any("_orig_mod" in k for k in saved)
    plain, plain_params = lora_unet(tiny_family)
    load_lora_into(plain, saved)
    for a, b in zip(params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a file written by a compiled run before the fix, into a compiled or plain UNet
    old_style = {k.replace("unet.", "unet._orig_mod.", 1): v for k, v in saved.items()}
    again, again_params = lora_unet(tiny_family)
    load_lora_into(torch.compile(again), old_style)
    for a, b in zip(params, again_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------- 2: the VAE under autocast


def test_the_vae_decodes_in_its_own_dtype_under_bf16_autocast(tiny_cache) -> None:
    """Training samples inside accelerator.autocast(): the UNet runs in bf16, the (fp32) VAE must not."""
    policy = build_lcm_policy(tiny_sdxl_family(tiny_cache), num_steps=2, guidance_scale=1.5)
    seen: dict[str, set[torch.dtype]] = {"vae": set(), "unet": set()}

    def record(name: str):  # noqa: ANN202
        return lambda module, args, output: seen[name].add(output.dtype)

    hooks = [
        m.register_forward_hook(record(name))
        for name, model in (("vae", policy.vae), ("unet", policy.denoiser))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            traj = policy.sample(["a red circle"], torch.Generator().manual_seed(0))
    finally:
        for h in hooks:
            h.remove()
    assert seen["unet"] == {torch.bfloat16}  # autocast is on for the policy's UNet ...
    assert seen["vae"] == {torch.float32}  # ... and off for the decode
    assert traj.images.dtype == torch.float32 and torch.isfinite(traj.images).all()


# ---------------------------------------------------------------- 6, 11, 13, 14: precision


@pytest.mark.parametrize(
    ("mixed", "dtype", "cuda", "expected"),
    [
        ("auto", "auto", False, ("no", "float32", False)),  # the CPU default: fp32 throughout
        ("auto", "auto", True, ("fp16", "float16", True)),  # CUDA: fp16 weights, fp16 autocast, TF32
        ("bf16", "auto", True, ("bf16", "bfloat16", True)),
        ("no", "auto", True, ("no", "float32", True)),
        ("bf16", "auto", False, ("bf16", "float32", False)),  # a CPU keeps fp32 weights
        ("fp16", "float32", True, ("fp16", "float32", True)),
        ("auto", None, True, ("fp16", None, True)),  # a family without model.dtype (tiny, toy)
    ],
)
def test_precision_resolution(mixed, dtype, cuda, expected) -> None:
    p = resolve_precision(mixed, dtype, cuda, env={})
    assert (p.mixed_precision, p.model_dtype, p.tf32) == expected


@pytest.mark.parametrize(
    ("mixed", "dtype"), [("no", "float16"), ("bf16", "float16"), ("no", "bfloat16"), ("fp16", "bfloat16")]
)
def test_precision_combinations_that_do_not_train_are_refused_in_one_line(mixed, dtype) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_precision(mixed, dtype, cuda=True, env={})
    message = str(err.value)
    assert "\n" not in message and f"model.dtype={dtype} with mixed_precision={mixed}" in message
    assert "float16 with mixed_precision=fp16" in message  # names the valid ones


def test_the_launchers_mixed_precision_is_used_or_refused() -> None:
    env = {LAUNCHER_ENV: "bf16"}
    assert resolve_precision("auto", "auto", True, env=env).mixed_precision == "bf16"
    assert resolve_precision("bf16", None, True, env=env).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="accelerate launch --mixed_precision bf16"):
        resolve_precision("fp16", None, True, env=env)
    # accelerate launch sets "no" without the flag too: the config decides
    assert resolve_precision("fp16", None, True, env={LAUNCHER_ENV: "no"}).mixed_precision == "fp16"


def test_tf32_is_configurable_and_off_on_a_cpu() -> None:
    assert not resolve_precision("auto", None, cuda=True, tf32=False, env={}).tf32
    assert not resolve_precision("auto", None, cuda=False, tf32=True, env={}).tf32


@pytest.mark.slow  # two tiny in-process runs (48 s on the loaded 2-core machine)
def test_two_in_process_runs_with_different_precisions(tiny_cache, tmp_path, monkeypatch) -> None:
    """accelerate keeps one AcceleratorState per process; each run starts its own."""
    from accelerate.state import AcceleratorState

    import rlcm_exp

    from .helpers import SMALL

    monkeypatch.delenv(LAUNCHER_ENV, raising=False)
    quick = [*SMALL, "train.epochs=1", "train.eval_every=0", "train.save_images=0", "device=cpu"]
    for i, precision in enumerate(("bf16", "no")):
        records = rlcm_exp.run([*quick, f"mixed_precision={precision}"], run_dir=tmp_path / str(i))
        assert len(records) == 1 and AcceleratorState().mixed_precision == precision


# ---------------------------------------------------------------- 7: weights load in the configured dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_load_in_the_configured_dtype(tiny_family, dtype) -> None:
    pipe = replace(tiny_family, dtype=dtype).load("lcm")
    expected = getattr(torch, dtype)
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {expected}, name


def test_auto_dtype_outside_training_is_fp16_on_cuda_only() -> None:
    assert load_dtype("auto", "cpu") == "float32"
    assert load_dtype("auto", torch.device("cuda", 0)) == "float16"
    assert load_dtype("bfloat16", "cpu") == "bfloat16"


# ---------------------------------------------------------------- 9: one precision for a reward


def test_training_heldout_and_evaluate_score_a_reward_in_one_precision(tiny_family) -> None:
    """Training scores in a worker thread (autocast off there), held-out evaluation inside the run's
    autocast, the evaluate command without one: the same images get the same rewards in all three."""
    conv = torch.nn.Conv2d(3, 4, 3)  # a model reward: its value depends on the precision it runs in
    autocast_seen = []

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return conv(images).mean(dim=(1, 2, 3))

    policy = build_lcm_policy(tiny_family, num_steps=2, guidance_scale=1.5)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's held-out evaluation
        held_out = evaluate_policy(policy, reward, prompts, seeds, batch_size=4)
    images, captions = held_out["eval_images"], [p for _ in seeds for p in prompts]
    with ThreadPoolExecutor(1) as pool, torch.autocast("cpu", dtype=torch.bfloat16):  # training's scoring
        training = pool.submit(score_images, reward, images, captions).result()["reward"]
    command = score_images(reward, images, captions)["reward"]  # the evaluate command: no autocast
    torch.testing.assert_close(
        torch.from_numpy(held_out["eval_values"]["reward"]).float().reshape(-1), command
    )
    torch.testing.assert_close(training, command, rtol=0, atol=0)
    assert not any(autocast_seen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # what held-out scored before
        assert not torch.equal(reward(images, captions).float(), command)


# ---------------------------------------------------------------- 5: reduced precision and the clip range


@pytest.mark.slow  # a tiny round, trained twice (30 s on the loaded 2-core machine)
def test_recomputed_old_log_probs_make_the_first_ratios_exactly_one(tmp_path) -> None:
    """Old log-probs from a sampling forward that computes differently from the training forward (here
    fp32 sampling, bf16 training: on a GPU, bf16 calls of different batch sizes, ~1e-2 apart for a
    full-size UNet) make the first ratios leave the 1e-4 clip range; a warning says so. Recomputed in
    the training calls' layout and precision, they are exactly 1."""
    from rlcm_exp.configs import compose
    from rlcm_exp.training.build import build_trainer, make_accelerator
    from rlcm_exp.training.update import PolicyGradientUpdate, UpdateContext

    cfg = compose(
        overrides=[
            "model=tiny", "task=compression", "algo=ddpo", "sampler.num_steps=4", "sampler.guidance_scale=5.0",
            "train.samples_per_epoch=8", "train.sample_batch_size=8", "train.train_batch_size=8",
            "train.samples_per_step=8", "train.reward_workers=0", "device=cpu",
        ]
    )  # fmt: skip
    trainer = build_trainer(cfg, tmp_path, make_accelerator(cfg))
    ctx = UpdateContext(
        trainer.policy, trainer.accelerator, trainer.plan, trainer.algo, trainer.optimization, 0
    )
    assert not trainer.algo.update.recomputes(ctx)  # auto: off in fp32, so fixed-seed fp32 runs are unchanged
    traj, rewards, _ = trainer.sample_round(0)
    advantages, _ = trainer.advantages(traj.prompts, rewards["reward"])
    start = [p.detach().clone() for p in trainer.params]
    trainer.algo.update = PolicyGradientUpdate(recompute_old_log_probs=False)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="exceeds algo.ppo"):
        sampled = trainer.update(0, traj, advantages)
    assert sampled["ratio_first_max_dev"] > trainer.algo.ppo.clip_range
    with torch.no_grad():
        for p, p0 in zip(trainer.params, start, strict=True):
            p.copy_(p0)
    trainer.algo.update = PolicyGradientUpdate(recompute_old_log_probs=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recomputed = trainer.update(0, traj, advantages)
    assert recomputed["ratio_first_max_dev"] == 0.0 and recomputed["ratio_first"] == 1.0
    trainer.close()


@pytest.mark.parametrize("model", ["dreamshaper_v7", "sd15_lcm_lora", "sdxl_lcm"])
def test_paper_runs_keep_frozen_weights_in_the_mixed_precision_dtype_on_cuda(model) -> None:
    """What `make gpu-check` measures (fp16 weights, fp16 autocast) is what a paper run uses on CUDA."""
    from rlcm_exp.configs import compose

    cfg = compose(overrides=[f"model={model}"])
    assert cfg.model.dtype == "auto"
    on_cuda = resolve_precision(cfg.mixed_precision, cfg.model.dtype, cuda=True, env={})
    assert (on_cuda.mixed_precision, on_cuda.model_dtype) == ("fp16", "float16")
    assert (
        resolve_precision(cfg.mixed_precision, cfg.model.dtype, cuda=False, env={}).model_dtype == "float32"
    )


def test_apply_tf32_sets_the_cuda_flags() -> None:
    from rlcm_exp.models.precision import apply_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        apply_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        apply_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        torch.set_float32_matmul_precision("highest")


def test_the_llava_reward_loads_in_float16_on_cuda_by_default() -> None:
    """15: a 13B VLM in float32 (~52 GB of weights) does not fit the paper's 48 GB reward GPU."""
    import inspect

    from omegaconf import OmegaConf

    from rlcm_exp.rewards.llava import llava_bertscore

    conf = OmegaConf.load(CONF / "reward" / "llava_bertscore.yaml")
    assert conf.dtype == "auto" == inspect.signature(llava_bertscore).parameters["dtype"].default
    assert load_dtype(conf.dtype, "cuda") == "float16" and load_dtype(conf.dtype, "cpu") == "float32"

"""The memory model of a training call (rlcm_exp/models/memory.py): hand-worked estimates and knobs,
the paper configurations it refuses on an 80 GB GPU (issue 29 findings 3, 4), the per-family
defaults that fit (SDXL: checkpointing; LCM-LoRA: guidance 1, finding 8), and a run refused before
any model loads. Estimates only: no GPU measured them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hydra.utils import instantiate

import rlcm_exp
from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.models.memory import GIB, MemoryProfile, TrainingCall, estimate, knob, refusal
from rlcm_exp.policies.members import sampler_member
from rlcm_exp.training.memory_check import training_call

P = MemoryProfile(
    frozen_params_b=1.0, reference_resolution=512, activation_gib=2.0, checkpointed_activation_gib=0.5
)
# 2 trajectories x 3 transitions x 2 (CFG) = 12 images per call at 512 px, fp16 weights and autocast
CALL = TrainingCall(
    train_batch_size=2,
    transitions=3,
    cfg_doubled=True,
    resolution=512,
    checkpointing=False,
    weight_bytes=2,
    autocast_16bit=True,
)
GPU_80GB = 80e9  # bytes free on an 80 GB GPU before anything loads (about 74.5 GiB)


def test_hand_worked_estimates() -> None:
    e = estimate(P, CALL)
    assert CALL.images == 12
    assert e.weights == 2e9 and e.activations == 12 * 2.0 * GIB  # 1e9 params x 2 B; 12 images x 2 GiB
    assert estimate(P, replace(CALL, resolution=1024)).activations == 4 * 12 * 2.0 * GIB  # 4x the latent area
    assert (
        estimate(P, replace(CALL, autocast_16bit=False)).activations == 2 * 12 * 2.0 * GIB
    )  # fp32 activations
    assert estimate(P, replace(CALL, checkpointing=True)).activations == 12 * 0.5 * GIB
    assert estimate(P, replace(CALL, weight_bytes=4)).weights == 4e9
    # a family without activation figures is estimated by its weights only
    assert estimate(replace(P, activation_gib=None), CALL).activations is None


def test_the_knob_is_the_first_change_that_fits() -> None:
    # weights 2e9 B = 1.86 GiB. Budget 18 GiB: 3 -> 1 transition per call = 4 images x 2 GiB = 8 GiB: fits
    assert knob(P, CALL, 18 * GIB, trained=3) == "set train.transitions_per_forward=1"
    # budget 6 GiB: 8 + 1.86 does not fit; checkpointed 4 x 0.5 = 2 + 1.86 GiB does
    assert knob(P, CALL, 6 * GIB, trained=3) == (
        "set memory.gradient_checkpointing=true and train.transitions_per_forward=1"
    )
    # budget 3 GiB: checkpointed batch 1 = 2 images x 0.5 + 1.86 = 2.86 GiB
    assert knob(P, CALL, 3 * GIB, trained=3).startswith("set train.train_batch_size=1 with")
    # fp32 weights (3.73 GiB) on a 3 GiB budget: only 16-bit weights bring it in
    assert knob(P, replace(CALL, weight_bytes=4), 3 * GIB, trained=3).startswith("set model.dtype=float16")
    assert "more memory" in knob(P, CALL, 1 * GIB, trained=3)
    # 6 transitions per call, trained 6: the largest divisor that fits comes first (3: 12 images = 24 GiB)
    assert knob(P, replace(CALL, transitions=6), 30 * GIB, trained=6) == "set train.transitions_per_forward=3"


def test_refusal_is_one_line_with_the_estimate_and_the_knob() -> None:
    assert refusal(P, CALL, 40 * GIB, trained=3) is None  # 25.9 GiB <= 90% of 40
    why = refusal(P, CALL, 20 * GIB, trained=3)
    assert why is not None and "\n" not in why
    assert "12 images at 512 px" in why and "an estimate" in why and why.endswith("transitions_per_forward=1")


def _call(overrides: list[str]) -> tuple[MemoryProfile, TrainingCall, int]:
    cfg = compose("config", [*overrides, "mixed_precision=fp16"])
    cfg.model.dtype = "float16"  # what model.dtype=auto resolves to on CUDA under fp16
    family = instantiate(cfg.model)
    stated = training_call(cfg, family, sampler_member(cfg.sampler), "fp16")
    assert stated is not None
    return stated


@pytest.mark.parametrize(
    ("overrides", "images", "knob_key"),
    [
        # finding 3: paper DDPO stacks 50 steps x 4 trajectories x CFG 2 = 400 images in one call
        (
            ["algo=ddpo", "task=aesthetic", "train.transitions_per_forward=0"],
            400,
            "train.transitions_per_forward=",
        ),
        # finding 3: RLCM prompt alignment, 'all' transitions at 768 px
        (
            ["algo=rlcm", "task=prompt_alignment", "train.transitions_per_forward=0"],
            None,
            "transitions_per_forward=",
        ),
        # finding 4: SDXL DDPO at the paper's per-process batch (4 x CFG 2 at 1024 px) without checkpointing
        (
            ["model=sdxl_lcm", "algo=ddpo", "task=aesthetic", "memory.gradient_checkpointing=false"],
            8,
            "checkpointing",
        ),
    ],
)
def test_paper_configurations_that_cannot_fit_80gb_are_refused(overrides, images, knob_key) -> None:
    profile, call, trained = _call(overrides)
    if images is not None:
        assert call.images == images
    why = refusal(profile, call, GPU_80GB, trained)
    assert why is not None and knob_key in why, why


@pytest.mark.parametrize(
    "overrides",
    [
        ["algo=ddpo", "task=aesthetic"],  # the default: one transition per call
        ["algo=rlcm", "task=prompt_alignment"],
        ["model=sdxl_lcm", "algo=ddpo", "task=aesthetic"],  # conf/model_defaults/sdxl_lcm.yaml: checkpointing
        ["model=sdxl_lcm", "algo=rlcm", "task=aesthetic"],
        ["model=sd15_lcm_lora", "algo=rlcm", "task=aesthetic"],
        ["model=sd35_large", "algo=grpo", "sampler=flow_sde"],  # model_defaults: checkpointing
        ["model=flux1", "algo=grpo", "sampler=flow_sde"],
    ],
)
def test_the_default_configurations_fit_80gb(overrides) -> None:
    profile, call, trained = _call(overrides)
    assert refusal(profile, call, GPU_80GB, trained) is None


@pytest.mark.parametrize(
    ("overrides", "guidance", "doubled"),
    [
        (["model=sd15_lcm_lora", "algo=rlcm"], 1.0, False),
        (["model=sdxl_lcm", "algo=grpo"], 1.0, False),
        (["model=sdxl_lcm", "algo=rlcm", "sampler.guidance_scale=2"], 2.0, True),  # an override wins
        (["model=sd15_lcm_lora", "algo=ddpo"], 5.0, True),  # DDPO's DDIM keeps classifier-free guidance
        (["model=dreamshaper_v7", "algo=rlcm"], 8.0, False),  # LCM-Dreamshaper's guidance is embedded
    ],
)
def test_lcm_lora_families_default_to_guidance_1_without_batch_doubling(overrides, guidance, doubled) -> None:
    cfg = compose("config", overrides)
    assert cfg.sampler.guidance_scale == guidance
    assert _call(overrides)[1].cfg_doubled is doubled


def test_a_run_that_cannot_fit_is_refused_before_any_model_loads(tmp_path) -> None:
    # dreamshaper-7 is not on this machine: a load would fail otherwise; fp32 on the CPU, 400 images
    with pytest.raises(ConfigError, match=r"transitions_per_forward=\d+$"):
        rlcm_exp.run(
            ["algo=ddpo", "task=compression", "train.transitions_per_forward=0", "device=cpu"],
            run_dir=tmp_path / "run",
        )

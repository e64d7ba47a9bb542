"""train.transitions_per_forward=auto (training/autotune.py): hand-worked candidates and choice within
the memory model's cap, the key's validation, and a tiny run that measures, logs its pick, and
trains the same first gradient as a fixed count (the warm-up steps nothing and leaks no gradient)."""

from __future__ import annotations

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.models.memory import GIB, MemoryProfile, TrainingCall, largest_transitions
from rlcm_exp.training.autotune import candidates, fastest
from rlcm_exp.training.build import build_trainer, make_accelerator
from rlcm_exp.validation import check_config
from tests.helpers import TOY_SMALL, first_update, run_in_process


def test_candidates_are_powers_of_two_dividing_the_trained_transitions_and_all() -> None:
    assert candidates(12, None) == [1, 2, 4, 12]  # 8 does not divide 12
    assert candidates(8, None) == [1, 2, 4, 8]
    assert candidates(5, None) == [1, 5]
    assert candidates(6, 2) == [1, 2]  # the memory cap drops 6
    assert candidates(8, 3) == [1, 2]
    assert candidates(1, None) == [1]
    assert candidates(4, 0) == [1]  # nothing fits: 1, the memory check refuses it before loading


def test_a_timing_table_picks_the_fastest_count_that_fits() -> None:
    # 1 GiB of weights, 1 GiB per image; batch 2 without CFG: n transitions per call = 1 + 2n GiB
    profile = MemoryProfile(frozen_params_b=GIB / 2e9, reference_resolution=64, activation_gib=1.0)
    call = TrainingCall(2, 1, False, 64, False, 2, True)
    cap = largest_transitions(profile, call, 12 * GIB, trained=8)  # 1 + 2n <= 12: n <= 5.5
    assert cap == 5
    # ms per trained transition, measured: 8 per call would be fastest but does not fit
    table = {1: 4.0, 2: 2.5, 4: 1.5, 8: 1.0}
    fits = candidates(8, cap)
    assert fits == [1, 2, 4]
    assert fastest({n: table[n] for n in fits}) == 4
    assert fastest(table) == 8
    assert fastest({1: 2.0, 2: 2.0, 4: 3.0}) == 1  # a tie goes to the smaller call (less memory)
    assert largest_transitions(profile, call, 2 * GIB, trained=8) == 0  # 3 GiB at n=1 > 2


def test_transitions_per_forward_takes_auto_zero_or_a_positive_count() -> None:
    cfg = compose(overrides=["model=tiny"])
    for ok in ("auto", 0, 3):
        cfg.train.transitions_per_forward = ok
        check_config(cfg)
    for bad in ("fast", -1, 1.5, "all"):
        cfg.train.transitions_per_forward = bad
        with pytest.raises(ConfigError, match=r"^train\.transitions_per_forward=.*'auto'") as err:
            check_config(cfg)
        assert "\n" not in str(err.value)


def _first_update(tmp_path, per_call: str) -> tuple[object, list[torch.Tensor], dict]:
    cfg = compose(
        overrides=[
            "experiment=toy/ddpo_compression", "sampler.num_steps=4",
            "train.samples_per_epoch=4", "train.sample_batch_size=4", "train.train_batch_size=2",
            "train.samples_per_step=4", f"train.transitions_per_forward={per_call}", "train.reward_workers=0",
            "logger=none",
        ]
    )  # fmt: skip
    trainer = build_trainer(cfg, tmp_path / f"run_{per_call}", make_accelerator(cfg))
    stats, grads = first_update(trainer)
    return trainer, grads, stats


def test_auto_measures_logs_its_pick_and_trains_the_same_gradient(tmp_path, capsys) -> None:
    trainer, grads, stats = _first_update(tmp_path, "auto")
    line = capsys.readouterr().out
    assert "train.transitions_per_forward=auto picked" in line
    counts = candidates(trainer.plan.trained_transitions, None)
    assert len(counts) > 1 and all(f"{n}: " in line for n in counts)  # each candidate timed
    picked = trainer.plan.transitions_per_forward
    assert picked in counts and f"picked {picked} " in line
    assert (
        (trainer.run_dir / "transitions_per_forward.txt")
        .read_text()
        .startswith("train.transitions_per_forward=auto picked")
    )
    assert trainer.optimization.steps == 1  # the warm-up stepped nothing
    # the same gradient as a fixed count: the warm-up's backward passes left none behind
    _, fixed, fixed_stats = _first_update(tmp_path, "1")
    for g, g0 in zip(grads, fixed, strict=True):
        torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
    assert stats["loss"] == pytest.approx(fixed_stats["loss"], rel=1e-5, abs=1e-6)


def test_a_run_with_auto_trains_through_the_library(tmp_path) -> None:
    overrides = [
        *TOY_SMALL,
        "sampler.num_steps=4",
        "train.epochs=1",
        "train.eval_every=0",
        "train.transitions_per_forward=auto",
    ]
    records = run_in_process(overrides, tmp_path / "run")
    assert len(records) == 1 and records[0]["optimizer_steps"] == 1
    assert "auto picked" in (tmp_path / "run" / "transitions_per_forward.txt").read_text()

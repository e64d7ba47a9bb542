"""optimizer=adam8bit (issue 29 finding 16): without bitsandbytes one line before any model loads;
with it (not a project dependency: skipped where absent) a LoRA trains one step on the CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.training.build import build_trainer, make_accelerator
from rlcm_exp.validation import check_before_loading
from tests.helpers import TOY_SMALL, first_update

# rank 64: the toy LoRA's A and B matrices reach 64 x 64 = 4096 values, where the moments go 8-bit
OVERRIDES = [
    *TOY_SMALL,
    "optimizer=adam8bit",
    "algo.lora.rank=64",
    "train.reward_workers=0",
    "optimizer.lr=0.01",
]


def test_without_bitsandbytes_the_run_stops_before_loading(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ConfigError, match=r"^optimizer=adam8bit needs bitsandbytes.*optimizer=adam$") as err:
        check_before_loading(compose(overrides=OVERRIDES))
    assert "\n" not in str(err.value)


def test_a_lora_trains_one_step_with_8bit_adam(tmp_path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    cfg = compose(overrides=OVERRIDES)
    check_before_loading(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", make_accelerator(cfg))
    assert isinstance(trainer.optimizer.optimizer, bnb.optim.Adam8bit)  # accelerate wraps it
    before = [p.detach().clone() for p in trainer.params]
    stats, grads = first_update(trainer)
    assert trainer.optimization.steps == 1 and len(grads) == len(before)
    assert all(torch.isfinite(p).all() for p in trainer.params)
    moved = [not torch.equal(p, b) for p, b in zip(trainer.params, before, strict=True)]
    assert any(moved) and stats["grad_norm"] > 0
    states = [trainer.optimizer.optimizer.state[p] for p in trainer.params if p.numel() >= 4096]
    # tensors of 4096 values or more keep both moments in 8 bits
    assert states, "the toy LoRA has no tensor of 4096 values"
    assert all(s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states)

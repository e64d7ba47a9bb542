"""train.transitions_per_forward stacks trained transitions into one UNet call: the loss, its gradient
and the logged metrics are those of one transition per call (fp32, atol 1e-6), for both samplers,
with classifier-free guidance on and off; the first-minibatch ratio stays 1."""

from __future__ import annotations

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.training.batching import plan_batches
from rlcm_exp.training.build import build_trainer, make_accelerator
from tests.helpers import first_update

SAMPLERS = {  # each trains 4 transitions per trajectory, so 1, 2 and 4 (= 0, all) divide it
    "lcm": ["algo=rlcm", "sampler.num_steps=5"],
    "ddim_cfg": ["algo=ddpo", "sampler.num_steps=4", "sampler.guidance_scale=5.0"],
    "ddim_no_cfg": ["algo=ddpo", "sampler.num_steps=4", "sampler.guidance_scale=1.0"],
    # REBEL's loss of whole trajectories: a no-grad pass + per-call surrogate, or one call (issue 21)
    "lcm_rebel": ["algo=rebel", "sampler.num_steps=5", "algo.loss.eta=1.0"],  # eta 1: gradients of the
    # other cases' scale, so that the same fp32 tolerances apply (1/eta scales them)
}


def one_update(tmp_path, sampler: list[str], per_call: int) -> tuple[dict, list[torch.Tensor]]:
    cfg = compose(
        overrides=[
            "model=tiny", "task=compression", *sampler, "train.samples_per_epoch=8", "train.sample_batch_size=8",
            "train.train_batch_size=4", "train.samples_per_step=8", f"train.transitions_per_forward={per_call}",
            "train.reward_workers=0", "logger=none",
        ]
    )  # fmt: skip
    trainer = build_trainer(cfg, tmp_path / f"run{per_call}", make_accelerator(cfg))
    return first_update(trainer)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_stacked_transitions_give_the_same_gradient_and_metrics(tmp_path, sampler) -> None:
    base_stats, base_grads = one_update(tmp_path, SAMPLERS[sampler], 1)
    assert base_grads and any(g.abs().sum() > 0 for g in base_grads)
    for per_call in (2, 0):
        stats, grads = one_update(tmp_path, SAMPLERS[sampler], per_call)
        assert len(grads) == len(base_grads)
        for g, g0 in zip(grads, base_grads, strict=True):
            torch.testing.assert_close(g, g0, atol=1e-6, rtol=1e-5)
        assert stats.keys() == base_stats.keys()
        for key, value in base_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                key
            )  # fp32 rounding of a larger batch
        assert stats["ratio_first"] == pytest.approx(1.0, abs=1e-5)


def test_the_plan_checks_and_counts_the_calls() -> None:
    sizes = dict(
        world_size=1, samples_per_epoch=16, sample_batch_size=8, train_batch_size=4, samples_per_step=16,
        inner_epochs=1, transitions_per_trajectory=6, timestep_fraction=1.0,
    )  # fmt: skip
    assert plan_batches(**sizes).unet_training_calls == 4 * 6
    assert plan_batches(**sizes, transitions_per_forward=3).unet_training_calls == 4 * 2
    assert plan_batches(**sizes, transitions_per_forward=0).transitions_per_forward == 6
    with pytest.raises(ConfigError, match="train.transitions_per_forward=4"):
        plan_batches(**sizes, transitions_per_forward=4)

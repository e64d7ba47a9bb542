"""Every paper config runs what the reference code ran (RLCM: the paper's code; DDPO: ddpo-pytorch
config/dgx.py), held to a table of the reference's numbers.

One runner epoch is one sampling round. RLCM's reference samples a round and takes ONE optimizer
step on it, `batches_per_epoch` rounds per reference epoch; DDPO takes several steps per round.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from rlcm_exp.configs import compose
from rlcm_exp.training.build import check_batches

# (algo, task): trajectories per round, optimizer steps per round, rounds, total trajectories,
# LR at the last step, LoRA rank, LoRA alpha, sampler steps, guidance scale
REFERENCE = {
    ("rlcm", "compression"): (16, 1, 100 * 10, 16_000, 1e-4 * 2 / 3, 16, 32, 8, 8.0),
    ("rlcm", "incompression"): (16, 1, 100 * 10, 16_000, 1e-4 * 2 / 3, 16, 32, 8, 8.0),
    ("rlcm", "aesthetic"): (32, 1, 100 * 10, 32_000, 1e-4 * 2 / 3, 8, 8, 8, 8.0),
    ("rlcm", "prompt_alignment"): (120, 1, 118 * 6, 84_960, 1e-4 * 2 / 3, 16, 32, 16, 8.0),
    ("ddpo", "compression"): (256, 4, 100, 25_600, 3e-4, 4, 4, 50, 5.0),
    ("ddpo", "incompression"): (256, 4, 100, 25_600, 3e-4, 4, 4, 50, 5.0),
    ("ddpo", "aesthetic"): (256, 2, 200, 51_200, 3e-4, 4, 4, 50, 5.0),
    ("ddpo", "prompt_alignment"): (288, 2, 200, 57_600, 3e-4, 4, 4, 50, 5.0),
}


def final_lr(cfg, total_steps: int) -> float:
    """The LR of the last optimizer step, from the configured optimizer and schedule themselves."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.optimizer)([param])
    schedule = instantiate(cfg.algo).lr_schedule(optimizer, total_steps)
    lr = optimizer.param_groups[0]["lr"]
    for _ in range(total_steps):  # the LR each step uses is the one set before it
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
    return lr


@pytest.mark.parametrize(("algo", "task"), sorted(REFERENCE))
def test_paper_config_matches_the_reference(algo: str, task: str) -> None:
    per_round, steps_per_round, rounds, total, lr_end, rank, alpha, steps, guidance = REFERENCE[algo, task]
    cfg = compose(overrides=[f"experiment=paper/{algo}_{task}"])
    t = cfg.train
    # sizes are global: the plan means the same on the reference's GPU count as on one process
    plan = check_batches(cfg, world_size=1, transitions=steps)
    got = (
        plan.samples_per_epoch,
        plan.optimizer_steps_per_epoch,
        t.epochs,
        t.epochs * plan.samples_per_epoch,
        final_lr(cfg, t.epochs * plan.optimizer_steps_per_epoch),
        cfg.algo.lora.rank,
        cfg.algo.lora.alpha,
        cfg.sampler.num_steps,
        cfg.sampler.guidance_scale,
    )
    assert got[:4] == (per_round, steps_per_round, rounds, total)
    assert got[4] == pytest.approx(lr_end, rel=1e-3)
    assert got[5:] == (rank, alpha, steps, guidance)


def test_imagenet_prompts_are_the_reference_strings() -> None:
    from rlcm_exp.prompts import prompt_set

    full, short = prompt_set("imagenet_animals"), prompt_set("imagenet_animals_short")
    assert len(full) == len(short) == 398
    assert full[0] == "tench, Tinca tinca" and short[0] == "tench"
    assert full[397] == "puffer, pufferfish, blowfish, globefish"
    # the short name is one of the synonyms of the same class, for all but torchvision's renames
    same_class = sum(
        s.lower() in [w.strip().lower() for w in f.split(",")] for f, s in zip(full, short, strict=True)
    )
    assert same_class >= 390
    for t in ("compression", "incompression"):
        assert compose(overrides=[f"task={t}"]).task.prompts.name == "imagenet_animals"

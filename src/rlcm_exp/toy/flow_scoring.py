"""Measure the toy flow pair loaded from disk; write DIR/quality.json.

Detector scores (mean over n samples per setting), training and held-out compositions apart: the
teacher by the scheduler's Euler steps with classifier-free guidance at 50, 25 and 4 steps; the
teacher at 4 steps at each scale of a guidance sweep on all n samples, whose best (`teacher4_best`,
picked per split: the most favourable to the teacher) is what the student at 4 steps must beat by
0.05; the student at 1/2/4/8 steps (multistep consistency sampler). A small sweep on `sweep_n`
samples picks each member's guidance scale. `parts` holds each setting's hit rate per detector third.

The samplers are rlcm_exp.toy.flow's (the quality table's own, until the flow policies replace them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from rlcm_exp.toy import data
from rlcm_exp.toy.build import NO_SAFETY_CHECKER, guidance_embedding, tokenize
from rlcm_exp.toy.flow import student_sample, teacher_sample
from rlcm_exp.toy.scoring import cycle, judge, reconstructions

TEACHER_SWEEP = (2.0, 3.0, 5.0, 8.0)
STUDENT_SWEEP = (2.0, 3.0, 5.0, 8.0)
TEACHER4_SWEEP = (1.5, 2.0, 3.0, 5.0, 8.0)
MARGIN = 0.05  # the student at 4 steps must beat the best teacher at 4 steps by this much


@dataclass
class FlowMember:
    """One saved member (the pipeline folder as a container of components) and how to sample it."""

    pipe: StableDiffusionPipeline
    few_step: bool  # True: the student (consistency sampler, guidance embedding); False: the teacher

    @torch.no_grad()
    def states(self, prompts: list[str]) -> torch.Tensor:
        """The frozen text encoder's last hidden states of `prompts`."""
        return self.pipe.text_encoder(tokenize(self.pipe.tokenizer, prompts))[0]

    @torch.no_grad()
    def sample(
        self, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 256
    ) -> torch.Tensor:
        """Float [0, 1] NCHW images of `prompts`, batch by batch from one generator seeded with `seed`."""
        gen = torch.Generator().manual_seed(seed)
        unet, vae = self.pipe.unet, self.pipe.vae
        out = []
        for i in range(0, len(prompts), batch):
            cond = self.states(prompts[i : i + batch])
            shape = (len(cond), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            noise = torch.randn(shape, generator=gen)
            if self.few_step:
                w_emb = guidance_embedding(torch.full((len(cond),), guidance - 1.0))
                lat = student_sample(unet, cond, w_emb, noise, steps, gen)
            else:
                uncond = self.states([""]).expand(len(cond), -1, -1)
                lat = teacher_sample(unet, cond, uncond, noise, steps, guidance)
            images = vae.decode(lat / vae.config.scaling_factor).sample
            out.append(images.add(1).div(2).clamp(0, 1).float())
        return torch.cat(out)

    def score(
        self, prompts: list[str], seed: int, steps: int, guidance: float
    ) -> tuple[float, dict[str, float]]:
        """Mean detector score and per-third hit rates of samples of `prompts`."""
        return judge(self.sample(prompts, seed, steps, guidance), prompts)


def load_flow_pair(weights: str | Path) -> tuple[FlowMember, FlowMember]:
    """(teacher, student), float32 (stored as fp16). The folders are StableDiffusionPipeline folders
    whose scheduler is a FlowMatchEulerDiscreteScheduler: `from_pretrained` loads them, but the
    pipeline's own __call__ is for VP models and refuses the flow scheduler; sample with FlowMember."""
    weights = Path(weights)
    common = {"dtype": torch.float32, **NO_SAFETY_CHECKER}
    pipes = [
        StableDiffusionPipeline.from_pretrained(str(weights / name), **common)
        for name in ("teacher", "student")
    ]
    return FlowMember(pipes[0], few_step=False), FlowMember(pipes[1], few_step=True)


def _sweep(
    member: FlowMember, steps: int, scales: tuple[float, ...], splits: dict, n: int, seed: int
) -> dict:
    """{scale: {split: score}} on `n` samples per split."""
    return {
        str(g): {split: member.score(cycle(p, n), seed, steps, g)[0] for split, p in splits.items()}
        for g in scales
    }


def _best(sweep: dict) -> float:
    """The scale with the best mean over the splits."""
    return float(max(sweep, key=lambda g: sum(sweep[g].values())))


def _split_table(
    teacher: FlowMember, student: FlowMember, captions: list[str], seed: int, g: dict, bar
) -> tuple:  # noqa: ANN001
    """Every setting on one split's `captions`: (scores, parts, teacher-4 sweep)."""
    scores: dict = {}
    parts: dict = {}
    originals, rec = reconstructions(teacher.pipe.vae, captions, seed + 1)
    scores["data"], parts["data"] = judge(originals, captions)
    scores["vae_recon"], parts["vae_recon"] = judge(rec, captions)
    for steps in (50, 25, 4):
        scores[f"teacher{steps}"], parts[f"teacher{steps}"] = teacher.score(
            captions, seed + 2, steps, g["teacher"]
        )
        bar.update(1)
    by_guidance = {str(s): teacher.score(captions, seed + 2, 4, s) for s in TEACHER4_SWEEP}
    bar.update(len(TEACHER4_SWEEP))
    best = max(by_guidance, key=lambda s: by_guidance[s][0])
    scores["teacher4_best"], parts["teacher4_best"] = by_guidance[best]
    for steps in (1, 2, 4, 8):
        scores[f"student{steps}"], parts[f"student{steps}"] = student.score(
            captions, seed + 3, steps, g["student"]
        )
        bar.update(1)
    sweep4 = {"scores": {s: v for s, (v, _) in by_guidance.items()}, "best_guidance": float(best)}
    return scores, parts, sweep4


def flow_acceptance(scores: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The issue's check per split: the student at 4 steps beats the best teacher at 4 steps by 0.05."""
    return {
        f"student4-teacher4_best>={MARGIN}_{split}": sc["student4"] - sc["teacher4_best"] >= MARGIN
        for split, sc in scores.items()
    }


def measure_flow(weights: str | Path, n: int = 256, seed: int = 0, sweep_n: int = 64) -> dict:
    """Run every setting, write weights/quality.json and return it."""
    torch.set_flush_denormal(True)
    weights = Path(weights)
    teacher, student = load_flow_pair(weights)
    splits = {"train": data.train_prompts(), "heldout": data.heldout_prompts()}
    sweep: dict = {
        "n": sweep_n,
        "teacher25": _sweep(teacher, 25, TEACHER_SWEEP, splits, sweep_n, seed + 10),
        "student4": _sweep(student, 4, STUDENT_SWEEP, splits, sweep_n, seed + 11),
    }
    guidance = {"teacher": _best(sweep["teacher25"]), "student": _best(sweep["student4"])}
    result: dict = {
        "n_per_setting": n,
        "seed": seed,
        "scores": {},
        "sweep": sweep,
        "guidance_scale": guidance,
    }
    result.update(parts={}, teacher4_sweep={})
    bar = tqdm(total=2 * (7 + len(TEACHER4_SWEEP)), desc="flow quality", mininterval=5)
    for split, prompts in splits.items():
        scores, parts, sweep4 = _split_table(teacher, student, cycle(prompts, n), seed, guidance, bar)
        result["scores"][split], result["parts"][split], result["teacher4_sweep"][split] = (
            scores,
            parts,
            sweep4,
        )
    bar.close()
    result["acceptance"] = flow_acceptance(result["scores"])
    result["all_pass"] = all(result["acceptance"].values())
    (weights / "quality.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({"scores": result["scores"], "guidance": guidance}, indent=1))
    print("acceptance:", json.dumps(result["acceptance"]), flush=True)
    return result

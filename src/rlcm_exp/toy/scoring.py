"""Measure the toy model family with the real pipelines loaded from disk; write DIR/quality.json.

Detector scores (mean over n samples per setting), training and held-out compositions apart:
VAE reconstructions, DDIM 4/20/50 steps with classifier-free guidance, LCM 1/2/4/8 steps; a small
guidance sweep that picks the recommended guidance scales; mean JPEG size (quality 95) of LCM-4
samples; DDIM-4 at each scale of a guidance sweep on all n samples, whose best (`ddim4_best`,
picked per split: the most favourable to DDIM) is what the LCM-4 must beat; and the issue's
acceptance checks. `parts` holds each setting's hit rate per detector third (colour, shape,
background: which attribute fails); `ddim4_vs_ddim50_mean_abs_px`, how far DDIM-4 lands from
DDIM-50 when both start from the same noise.

`measure` is the whole table (`python -m rlcm_exp.toy.quality` and the end of the toy recipe);
`sample`, `sample_score` and `cycle` are how both sample the pipelines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import torch
import transformers
from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline
from tqdm.auto import tqdm

from rlcm_exp.rewards.base import encode_image, to_uint8
from rlcm_exp.toy import data
from rlcm_exp.toy.build import NO_SAFETY_CHECKER
from rlcm_exp.toy.detector import detector_parts, detector_score

DDIM_SWEEP = (2.0, 3.0, 5.0, 8.0)
LCM_SWEEP = (2.0, 3.0, 5.0, 8.0, 9.0)
DDIM4_SWEEP = (1.5, 2.0, 3.0, 5.0, 8.0)
PAPER_DDIM_GUIDANCE, PAPER_LCM_GUIDANCE = 5.0, 8.0
# A scale within this of the best sweep score loses to the paper's default (keeps configs aligned).
TOLERANCE = 0.02


def load_family(weights: str | Path) -> tuple[StableDiffusionPipeline, LatentConsistencyModelPipeline]:
    """Both members, upcast to float32 (stored as fp16 to keep the repository small)."""
    weights = Path(weights)
    common = {"dtype": torch.float32, **NO_SAFETY_CHECKER}
    ddim = StableDiffusionPipeline.from_pretrained(str(weights / "diffusion"), **common)
    lcm = LatentConsistencyModelPipeline.from_pretrained(str(weights / "lcm"), **common)
    for pipe in (ddim, lcm):
        pipe.set_progress_bar_config(disable=True)
    return ddim, lcm


def jpeg_bytes(images: torch.Tensor, quality: int = 95) -> np.ndarray:
    """Size in bytes of each float [0, 1] NCHW image saved as JPEG (the jpeg reward's encoding)."""
    return np.array([len(encode_image(a, "jpeg", quality)) for a in to_uint8(images)])


def cycle(prompts: list[str], n: int) -> list[str]:
    """`n` prompts, going round `prompts` in order."""
    return [prompts[i % len(prompts)] for i in range(n)]


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, batch: int = 256, **kwargs) -> torch.Tensor:  # noqa: ANN001
    """Float [0, 1] NCHW samples of `prompts`, batch by batch from one generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    outs = [
        pipe(prompts[i : i + batch], generator=gen, output_type="pt", **kwargs).images.float().cpu()
        for i in range(0, len(prompts), batch)
    ]
    return torch.cat(outs)


def sample_score(pipe, prompts: list[str], seed: int, **kwargs) -> float:  # noqa: ANN001
    """Mean detector score of pipeline samples of `prompts` (`kwargs` go to the pipeline)."""
    return float(detector_score(sample(pipe, prompts, seed, **kwargs), prompts).mean())


@torch.no_grad()
def reconstructions(vae, prompts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Fresh images of `prompts` and their VAE reconstructions (posterior mode), float [0, 1] NCHW."""
    images, _ = data.render(prompts, np.random.default_rng(seed))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    rec = torch.cat(
        [vae.decode(vae.encode(x[i : i + 256]).latent_dist.mode()).sample for i in range(0, len(x), 256)]
    )
    return x.add(1).div(2), rec.add(1).div(2).clamp(0, 1)


def judge(images: torch.Tensor, captions: list[str]) -> tuple[float, dict[str, float]]:
    """Mean detector score, and each third's hit rate (colour, shape, background: which attribute fails)."""
    hits = {k: float(v.mean()) for k, v in detector_parts(images, captions).items()}
    return float(np.mean(list(hits.values()))), hits


def _pick(scores: dict[float, float], default: float) -> float:
    best = max(scores.values())
    if scores.get(default, -1.0) >= best - TOLERANCE:
        return default
    return max(scores, key=lambda g: scores[g])


def _guidance_sweep(pipes: dict, splits: dict[str, list[str]], sweep_n: int, seed: int, bar: tqdm) -> dict:
    """{member: {scale: {split: score}}} on `sweep_n` samples: which scale to recommend for each member."""
    sweep: dict = {"n": sweep_n, "ddim20": {}, "lcm4": {}}
    settings = (
        ("ddim20", pipes["ddim"], 20, DDIM_SWEEP, seed + 10),
        ("lcm4", pipes["lcm"], 4, LCM_SWEEP, seed + 11),
    )
    for name, pipe, steps, scales, sweep_seed in settings:
        for g in scales:
            sweep[name][str(g)] = {
                split: sample_score(
                    pipe, cycle(p, sweep_n), sweep_seed, num_inference_steps=steps, guidance_scale=g
                )
                for split, p in splits.items()
            }
            bar.update(2)
    return sweep


def _recommend(sweep: dict, ddim_guidance: float | None, lcm_guidance: float | None) -> dict[str, float]:
    """The given scales, or else the sweep's pick (the paper's default unless clearly worse)."""

    def mean_of(d: dict) -> dict[float, float]:
        return {float(g): (v["train"] + v["heldout"]) / 2 for g, v in d.items()}

    g_ddim = (
        ddim_guidance if ddim_guidance is not None else _pick(mean_of(sweep["ddim20"]), PAPER_DDIM_GUIDANCE)
    )
    g_lcm = lcm_guidance if lcm_guidance is not None else _pick(mean_of(sweep["lcm4"]), PAPER_LCM_GUIDANCE)
    return {"ddim": g_ddim, "lcm": g_lcm, "lcm_w_embedding": g_lcm - 1.0}


def _ddim_scores(ddim, captions: list[str], seed: int, g_ddim: float, bar: tqdm) -> tuple[dict, dict, dict]:  # noqa: ANN001
    """DDIM 50/20/4 steps at `g_ddim`, then DDIM-4 at each scale of its sweep; (scores, parts, extra).

    extra: the DDIM-50 images, DDIM-4's distance to them and the DDIM-4 sweep record.
    """
    scores: dict = {}
    parts: dict = {}
    by_steps: dict[int, torch.Tensor] = {}
    for steps in (50, 20, 4):
        images = by_steps[steps] = sample(
            ddim, captions, seed + 2, num_inference_steps=steps, guidance_scale=g_ddim
        )
        scores[f"ddim{steps}"], parts[f"ddim{steps}"] = judge(images, captions)
        bar.update(1)
    # Same initial noise, deterministic DDIM: how far 4 steps land from 50 (0-255 per channel).
    # Small means a nearly straight sampling path, where few DDIM steps lose little.
    distance = float((by_steps[4] - by_steps[50]).abs().mean() * 255)
    # DDIM-4 at its own best guidance: a small model's few-step DDIM may prefer a low scale.
    by_guidance = {}
    for g in DDIM4_SWEEP:
        images = (  # same seed: at the recommended scale these are the DDIM-4 images above
            by_steps[4]
            if g == g_ddim
            else sample(ddim, captions, seed + 2, num_inference_steps=4, guidance_scale=g)
        )
        by_guidance[str(g)] = judge(images, captions)
        bar.update(1)
    best = max(by_guidance, key=lambda g: by_guidance[g][0])
    scores["ddim4_best"], parts["ddim4_best"] = by_guidance[best]
    ddim4_sweep = {"scores": {g: s for g, (s, _) in by_guidance.items()}, "best_guidance": float(best)}
    return scores, parts, {"ddim50": by_steps[50], "distance": distance, "ddim4_sweep": ddim4_sweep}


def _lcm_scores(
    lcm, captions: list[str], seed: int, g_lcm: float, bar: tqdm
) -> tuple[dict, dict, torch.Tensor]:  # noqa: ANN001
    """LCM 1/2/4/8 steps at `g_lcm`: (scores, parts, the LCM-4 images)."""
    scores: dict = {}
    parts: dict = {}
    lcm4 = torch.empty(0)
    for steps in (1, 2, 4, 8):
        images = sample(lcm, captions, seed + 3, num_inference_steps=steps, guidance_scale=g_lcm)
        scores[f"lcm{steps}"], parts[f"lcm{steps}"] = judge(images, captions)
        if steps == 4:
            lcm4 = images
        bar.update(1)
    return scores, parts, lcm4


def _score_splits(
    pipes: dict, splits: dict[str, list[str]], n: int, seed: int, guidance: dict, bar: tqdm
) -> dict:
    """Every setting on `n` samples per split: scores, parts, DDIM-4 sweep and distance, JPEG sizes."""
    ddim, lcm = pipes["ddim"], pipes["lcm"]
    result: dict = {"scores": {}, "parts": {}, "ddim4_vs_ddim50_mean_abs_px": {}, "ddim4_sweep": {}}
    jpeg: dict = {}
    for split, prompts in splits.items():
        captions = cycle(prompts, n)
        scores: dict = {}
        parts: dict = {}
        originals, rec = reconstructions(ddim.vae, captions, seed + 1)
        scores["data"], parts["data"] = judge(originals, captions)
        scores["vae_recon"], parts["vae_recon"] = judge(rec, captions)
        bar.update(1)
        ddim_scores, ddim_parts, extra = _ddim_scores(ddim, captions, seed, guidance["ddim"], bar)
        lcm_scores, lcm_parts, lcm4 = _lcm_scores(lcm, captions, seed, guidance["lcm"], bar)
        if split == "train":
            jpeg["ddim50"] = float(jpeg_bytes(extra["ddim50"]).mean())
            jpeg["lcm4"] = float(jpeg_bytes(lcm4).mean())
            jpeg["lcm4_std"] = float(jpeg_bytes(lcm4).std())
        result["ddim4_vs_ddim50_mean_abs_px"][split] = extra["distance"]
        result["ddim4_sweep"][split] = extra["ddim4_sweep"]
        result["parts"][split] = {**parts, **ddim_parts, **lcm_parts}
        result["scores"][split] = {**scores, **ddim_scores, **lcm_scores}
    data_images, _ = data.render(cycle(splits["train"], n), np.random.default_rng(seed + 1))
    jpeg["data"] = float(jpeg_bytes(torch.from_numpy(data_images).permute(0, 3, 1, 2).float() / 255).mean())
    result["jpeg_bytes_q95_train"] = jpeg
    return result


def acceptance(scores: dict[str, dict[str, float]]) -> dict[str, bool]:
    """The issue's acceptance checks on `scores` ({"train": ..., "heldout": ...})."""
    tr, ho = scores["train"], scores["heldout"]
    checks = {
        "vae_recon_train>=0.95": tr["vae_recon"] >= 0.95,
        "vae_recon_heldout>=0.95": ho["vae_recon"] >= 0.95,
        "ddim50_train>=0.80": tr["ddim50"] >= 0.80,
        "ddim50_heldout>=0.65": ho["ddim50"] >= 0.65,
    }
    for split, sc in (("train", tr), ("heldout", ho)):
        checks[f"lcm4>=0.9*ddim50_{split}"] = sc["lcm4"] >= 0.9 * sc["ddim50"]
        checks[f"lcm2>=0.8*ddim50_{split}"] = sc["lcm2"] >= 0.8 * sc["ddim50"]
        checks[f"lcm4-ddim4_best>=0.05_{split}"] = sc["lcm4"] - sc["ddim4_best"] >= 0.05
    return checks


def measure(
    weights: str | Path,
    n: int = 256,
    seed: int = 0,
    sweep_n: int = 64,
    ddim_guidance: float | None = None,
    lcm_guidance: float | None = None,
    threads: int | None = None,
) -> dict:
    """Run every setting, write weights/quality.json and return it (threads: None keeps torch's)."""
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # denormals make CPU convolutions very slow
    weights = Path(weights)
    ddim, lcm = load_family(weights)
    pipes = {"ddim": ddim, "lcm": lcm}
    splits = {"train": data.train_prompts(), "heldout": data.heldout_prompts()}
    bar = tqdm(
        total=2 * (len(DDIM_SWEEP) + len(LCM_SWEEP)) + 2 * (8 + len(DDIM4_SWEEP)),
        desc="quality",
        mininterval=5,
    )
    sweep = _guidance_sweep(pipes, splits, sweep_n, seed, bar)
    guidance = _recommend(sweep, ddim_guidance, lcm_guidance)
    table = _score_splits(pipes, splits, n, seed, guidance, bar)
    bar.close()
    checks = acceptance(table["scores"])
    # The key order of quality.json as it has always been written.
    result: dict = {"n_per_setting": n, "seed": seed, "scores": table["scores"], "sweep": sweep}
    result["recommended_guidance_scale"] = guidance
    result["parts"] = table["parts"]
    for key in ("ddim4_vs_ddim50_mean_abs_px", "ddim4_sweep", "jpeg_bytes_q95_train"):
        result[key] = table[key]
    result["acceptance"] = checks
    result["all_pass"] = all(checks.values())
    (weights / "quality.json").write_text(json.dumps(result, indent=1))
    summary = {"scores": result["scores"], "guidance": guidance, "jpeg": table["jpeg_bytes_q95_train"]}
    print(json.dumps(summary, indent=1))
    print("acceptance:", json.dumps(checks, indent=1), flush=True)
    return result

"""Reward: the toy world's detector score (does the image show what its caption says?). Part of the
toy plug-in: conf/reward/toy_detector.yaml names it; the library's rewards never import the toy world."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcm_exp.rewards.base import check_images
from rlcm_exp.toy.detector import PARTS, detector_parts


def toy_detector() -> Callable[[torch.Tensor, list[str]], dict[str, torch.Tensor]]:
    """Build the reward: images float32 in [0, 1], (B, 3, H, W), any device, plus B captions.

    Returns float32 CPU tensors (B,): "reward" in [0, 1], a third each for shape colour, shape and
    background colour, and each third's 0/1 hit as "colour", "shape", "background", so that
    metrics.jsonl and eval.jsonl say which attribute RL changed (logged as reward/shape, ...).
    Deterministic and cheap (~0.3 ms per image), so it runs in-process.
    """

    def reward(images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
        check_images(images, "toy_detector")
        parts = {k: torch.from_numpy(v).float() for k, v in detector_parts(images, list(captions)).items()}
        return {"reward": torch.stack([parts[k] for k in PARTS]).mean(0), **parts}

    return reward

"""Reward: the toy world's detector score (does the image show what its caption says?)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcm_exp.toy.detector import detector_score


def toy_detector() -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Build the reward: images float32 in [0, 1], (B, 3, H, W), any device, plus B captions.

    Returns a float32 CPU tensor (B,) in [0, 1]: a third each for background colour, shape colour
    and shape. Deterministic and cheap (~0.3 ms per image), so it runs in-process.
    """

    def reward(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
        return torch.from_numpy(detector_score(images, list(captions))).float()

    return reward

"""JPEG (in)compressibility: the size of the image saved as JPEG at a fixed quality, in kB.

Compressibility rewards small files (reward = -kB), incompressibility large ones (+kB), as in
DDPO and RLCM. The encoder is PIL's libjpeg; files are written to memory only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlcm_exp.rewards.base import encode_image, to_uint8


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG; images (B, 3, H, W) in [0, 1]."""
    # one device->host copy for the whole batch; libjpeg encodes one image per call
    sizes = [len(encode_image(img, "jpeg", quality)) / 1000.0 for img in to_uint8(images)]
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(quality: int = 95) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Reward = -(JPEG size in kB): higher for more compressible images."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, quality)

    return reward


def jpeg_incompressibility(quality: int = 95) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Reward = +(JPEG size in kB): higher for less compressible images."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images, quality)

    return reward

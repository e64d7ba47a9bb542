"""JPEG (in)compressibility: the size of the image saved as JPEG at a fixed quality, in kB.

Compressibility rewards small files (reward = -kB), incompressibility large ones (+kB), as in
DDPO and RLCM. The encoder is PIL's libjpeg; files are written to memory only.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG; images (B, 3, H, W) in [0, 1]."""
    # one device->host copy for the whole batch, then uint8 HWC as the encoder wants it
    array = (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
    sizes = np.empty(len(array), dtype=np.float32)
    for i, img in enumerate(array):  # libjpeg encodes one image per call
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000.0
    return torch.from_numpy(sizes)


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

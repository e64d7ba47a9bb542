"""Images in [0, 1] written as a PNG, one image or a grid, without torchvision (an air-gapped GPU
image may lack it): the layout of torchvision's `save_image` (a 2 px black border around every
cell, `nrow` cells a row; a single image unpadded) and its rounding (x * 255 + 0.5, clamped)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """(C, H', W') of the (N, C, H, W) or (C, H, W) `images`, `nrow` to a row, `padding` px of 0 between."""
    if images.dim() == 3 or images.shape[0] == 1:
        return images.reshape(images.shape[-3:])
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    out = images.new_zeros((c, rows * (h + padding) + padding, cols * (w + padding) + padding))
    for k in range(n):
        y, x = divmod(k, cols)
        top, left = y * (h + padding) + padding, x * (w + padding) + padding
        out[:, top : top + h, left : left + w] = images[k]
    return out


def save_png(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Write `images` (values in [0, 1]; one image or a batch) to `path` as an 8-bit PNG."""
    cells = grid(images.detach().float().cpu(), nrow)
    pixels = cells.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)

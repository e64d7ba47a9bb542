"""A deterministic detector: does the image show the shape, colour and background its caption names?

Score = (background right + shape colour right + shape right) / 3, each judged as follows:
- background: the most common palette colour of the border pixels (shapes never touch the border);
- foreground: pixels far from that background colour, isolated specks removed;
- shape colour: the most common palette colour among foreground pixels;
- shape: fill ratio of the foreground in its bounding box (square 1.0, circle pi/4, triangle 1/2).
An image with (almost) no foreground earns at most the background third.
"""

from __future__ import annotations

import numpy as np
import torch

from rlcm_exp.rewards.base import to_uint8
from rlcm_exp.toy.data import COLOURS, PALETTE, SHAPES, parse_caption

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # (6, 3)
# Half the smallest distance between two palette colours is ~55: farther than that from the
# background colour, a pixel belongs to something else.
FOREGROUND_DISTANCE = 55.0
MIN_FOREGROUND_PIXELS = 12
# Fill-ratio boundaries between triangle (0.5), circle (0.785) and square (1.0).
TRIANGLE_BELOW, CIRCLE_BELOW = 0.65, 0.93


def _to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept uint8 NHWC numpy or float [0, 1] NCHW torch (any device)."""
    if isinstance(images, torch.Tensor):
        return to_uint8(images)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"numpy images must be uint8 NHWC, got {images.dtype}")
    return images


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep a set pixel only when at least 2 of its 8 neighbours are set too.

    This removes isolated noise pixels without eroding thin parts of a shape (a full 3x3
    majority filter eats the corners of a small triangle and makes it look like a circle).
    """
    n, h, w = mask.shape
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1), (1, 1)))
    count = sum(padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return mask & (count >= 3)


def classify(images: np.ndarray | torch.Tensor) -> list[tuple[str | None, str | None, str]]:
    """(shape colour, shape, background) seen in each image; None where no shape is found."""
    x = _to_uint8_nhwc(images).astype(np.float32)
    n, h, w, _ = x.shape
    # Nearest palette colour of every pixel, (n, h, w).
    dist = np.linalg.norm(x[..., None, :] - _PALETTE, axis=-1)
    nearest = dist.argmin(-1)
    border = np.concatenate(
        [nearest[:, 0, :], nearest[:, -1, :], nearest[:, 1:-1, 0], nearest[:, 1:-1, -1]], axis=1
    )
    bg = np.array([np.bincount(b, minlength=len(COLOURS)).argmax() for b in border])
    far = np.take_along_axis(dist, bg[:, None, None, None], -1)[..., 0]
    mask = _drop_specks(far > FOREGROUND_DISTANCE)
    out: list[tuple[str | None, str | None, str]] = []
    for i in range(n):
        m = mask[i]
        count = int(m.sum())
        if count < MIN_FOREGROUND_PIXELS:
            out.append((None, None, COLOURS[bg[i]]))
            continue
        votes = np.bincount(nearest[i][m], minlength=len(COLOURS))
        votes[bg[i]] = 0  # a foreground pixel is never the background colour
        colour = COLOURS[int(votes.argmax())]
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        fill = count / box
        shape = SHAPES[2] if fill < TRIANGLE_BELOW else SHAPES[0] if fill < CIRCLE_BELOW else SHAPES[1]
        out.append((colour, shape, COLOURS[bg[i]]))
    return out


# What the detector checks, in the order of a caption's words' meaning: (colour, shape, background).
PARTS: tuple[str, ...] = ("colour", "shape", "background")


def detector_parts(images: np.ndarray | torch.Tensor, captions: list[str]) -> dict[str, np.ndarray]:
    """Per image, 1.0 where the detector sees the caption's shape colour / shape / background, else 0.0.

    A caption that is not a toy caption gets 0.0 in every part.
    """
    seen = classify(images)
    if len(seen) != len(captions):
        raise ValueError(f"{len(seen)} images but {len(captions)} captions")
    parts = {name: np.zeros(len(captions), dtype=np.float32) for name in PARTS}
    for i, (text, found) in enumerate(zip(captions, seen, strict=True)):
        want = parse_caption(text)
        if want is None:
            continue
        for name, w, f in zip(PARTS, want, found, strict=True):
            parts[name][i] = float(w == f)
    return parts


def detector_score(images: np.ndarray | torch.Tensor, captions: list[str]) -> np.ndarray:
    """Score in [0, 1] per image: a third each for background, shape colour and shape."""
    parts = detector_parts(images, captions)
    return np.mean([parts[name] for name in PARTS], axis=0).astype(np.float32)

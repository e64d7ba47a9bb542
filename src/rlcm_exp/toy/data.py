"""Procedural data: one coloured shape on a background of another colour, with its caption.

Images are 32x32: small enough that a CPU can train the whole model family in under an hour,
large enough that the shape is unambiguous and that a JPEG of a clean image (~0.9 kB at
quality 95) still carries a few hundred bytes of content above the ~0.65 kB of a flat one, so
a compression reward has something to remove.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32

# Well separated in RGB so that blur or noise never moves a pixel to a neighbouring colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (210, 20, 40),
    "green": (40, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 235, 40),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Held-out compositions (shape colour, shape, background). Each removes one of the three shapes
# of a colour pair, so every pair (colour, background), (colour, shape), (shape, background)
# is still seen in training: held-out prompts test recombination, not unseen words.
HELDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "circle", "blue"),
    ("green", "square", "yellow"),
    ("blue", "triangle", "orange"),
    ("yellow", "circle", "purple"),
    ("purple", "square", "red"),
    ("orange", "triangle", "green"),
    ("red", "triangle", "yellow"),
    ("blue", "square", "green"),
    ("purple", "circle", "orange"),
)

# Shape half-size in pixels, and the margin that keeps the border pure background (the
# detector reads the background from the border).
MIN_RADIUS, MAX_RADIUS, MARGIN = 5.0, 10.0, 2.0


def caption(colour: str, shape: str, background: str) -> str:
    """The caption of one composition, e.g. 'a red circle on a blue background'."""
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """(colour, shape, background) of a caption, or None if it is not a toy caption."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if colour not in PALETTE or background not in PALETTE or shape not in SHAPES:
        return None
    return colour, shape, background


def all_compositions() -> list[tuple[str, str, str]]:
    """All 90 compositions: 6 shape colours x 3 shapes x 5 other background colours."""
    return [(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, COLOURS) if c != b]


def train_prompts() -> list[str]:
    """The 81 captions used in training (all compositions minus the held-out ones)."""
    held = set(HELDOUT)
    return [caption(*comp) for comp in all_compositions() if comp not in held]


def heldout_prompts() -> list[str]:
    """The 9 captions never seen in training."""
    return [caption(*comp) for comp in HELDOUT]


def vocabulary() -> list[str]:
    """Every word a toy caption can contain (for the tokenizer)."""
    return ["a", "on", "background", *COLOURS, *SHAPES]


def render(
    captions_or_n: int | Sequence[str], rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[str]]:
    """Draw images for the given captions (or for n captions drawn from the training list).

    Returns uint8 images (N, size, size, 3) and the captions. Vectorised over the batch: one
    boolean mask per shape kind is evaluated on a shared pixel grid.
    """
    if isinstance(captions_or_n, int):
        prompts = train_prompts()
        captions = [prompts[i] for i in rng.integers(0, len(prompts), captions_or_n)]
    else:
        captions = list(captions_or_n)
    comps = [parse_caption(c) for c in captions]
    if any(c is None for c in comps):
        bad = [c for c, p in zip(captions, comps, strict=True) if p is None]
        raise ValueError(f"not toy captions: {bad[:3]}")
    n = len(captions)
    scale = size / IMAGE_SIZE
    r = rng.uniform(MIN_RADIUS, MAX_RADIUS, n) * scale
    lo, hi = r + MARGIN * scale, size - r - MARGIN * scale
    cx = lo + rng.uniform(0, 1, n) * (hi - lo)
    cy = lo + rng.uniform(0, 1, n) * (hi - lo)
    # Pixel centres, broadcast to (n, size, size).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (np.abs(dx) <= rr) & (np.abs(dy) <= rr)
    # Upward triangle: apex at (cx, cy - r), base of width 2r at cy + r; fills half its box.
    triangle = (np.abs(dy) <= rr) & (np.abs(dx) <= (dy + rr) / 2)
    kind = np.array([SHAPES.index(c[1]) for c in comps])[:, None, None]  # type: ignore[index]
    mask = np.where(kind == 0, circle, np.where(kind == 1, square, triangle))
    fg = np.array([PALETTE[c[0]] for c in comps], dtype=np.uint8)  # type: ignore[index]
    bg = np.array([PALETTE[c[2]] for c in comps], dtype=np.uint8)  # type: ignore[index]
    images = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    return images.astype(np.uint8), captions

"""Caption noise for the teacher: each attribute word of a training caption re-drawn at random.

Web captions are often wrong; training the toy teacher on captions whose attribute words are
sometimes re-drawn makes it need classifier-free guidance to follow its caption, as the real
models do. A re-drawn caption never becomes a held-out composition.
"""

from __future__ import annotations

import functools

import torch

from rlcm_exp.toy import data

# Probability of re-drawing each attribute word of a teacher training caption. With clean captions
# (recipe 1) a 1M-parameter teacher follows its caption at guidance 2 and DDIM-4 is as good as the
# LCM-4; with noisy ones it needs guidance, which few-step DDIM handles badly (README, toy world).
CAPTION_NOISE = 0.2


def caption_attributes(captions: list[str]) -> torch.Tensor:
    """(N, 3) indices of (shape colour, shape, background) of toy captions."""
    parsed = [data.parse_caption(c) for c in captions]
    triples = [p for p in parsed if p is not None]
    if len(triples) != len(captions):
        raise ValueError(
            "not toy captions: " + ", ".join(c for c, p in zip(captions, parsed, strict=True) if p is None)
        )
    return torch.tensor(
        [[data.COLOURS.index(c), data.SHAPES.index(s), data.COLOURS.index(b)] for c, s, b in triples]
    )


@functools.cache
def _training_caption_table() -> torch.Tensor:
    """(colour, shape, background) -> index into [""] + train_prompts(); -1 where not a training caption."""
    table = torch.full((len(data.COLOURS), len(data.SHAPES), len(data.COLOURS)), -1, dtype=torch.long)
    for i, (c, s, b) in enumerate(caption_attributes(data.train_prompts()).tolist()):
        table[c, s, b] = i + 1
    return table


def check_caption_noise(q: float) -> None:
    """Raise ValueError unless `q` is a probability in [0, 1)."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"caption_noise={q}: a probability in [0, 1) (0: clean captions)")


def noisy_caption_index(attrs: torch.Tensor, q: float, gen: torch.Generator) -> torch.Tensor:
    """Index into [""] + train_prompts() of each caption, each attribute re-drawn uniformly with prob q.

    A re-drawn caption that is not a training composition (held out, or shape colour = background)
    falls back to the true one, so no held-out caption is ever trained on.
    """
    table = _training_caption_table()
    noisy = attrs.clone()
    for k, n in enumerate((len(data.COLOURS), len(data.SHAPES), len(data.COLOURS))):
        redraw = torch.rand(len(attrs), generator=gen) < q
        noisy[redraw, k] = torch.randint(0, n, (int(redraw.sum()),), generator=gen)
    true = table[attrs[:, 0], attrs[:, 1], attrs[:, 2]]
    drawn = table[noisy[:, 0], noisy[:, 1], noisy[:, 2]]
    return torch.where(drawn >= 0, drawn, true)

"""A user's own reward, as the README shows: a plain function of (images, prompts)."""

import torch


def mean_red(images: torch.Tensor, prompts: list[str], weight: float = 1.0) -> torch.Tensor:
    return weight * images[:, 0].mean(dim=(1, 2)).cpu()

"""The calling side shared by in-process prompt-image rewards: batch-size check, input checks,
chunked scoring under one lock (rewards/base.py's `score_in_chunks`). A subclass defines
`scorer(images, prompts)`, the differentiable form."""

from __future__ import annotations

import threading

import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_images, check_prompts, score_in_chunks


class ChunkedPromptImageReward:
    """reward(images, prompts) -> (B,) float32 CPU scores, `batch_size` images per forward.

    Calls are serialised by a lock: thread-safe (the trainer scores in a worker thread), and one
    model forward at a time bounds accelerator memory.
    """

    name = "reward"

    def __init__(self, batch_size: int, models: dict[str, str]) -> None:
        if batch_size < 1:
            raise ConfigError(f"reward.batch_size={batch_size} must be >= 1 (images per model forward)")
        self.batch_size = batch_size
        self.models = models
        self._lock = threading.Lock()

    def scorer(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable (B,) scores on the model's device."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, self.name)
        check_prompts(images, prompts)
        return score_in_chunks(
            lambda part: self.scorer(images[part], list(prompts[part])),
            len(images),
            self.batch_size,
            self._lock,
        )

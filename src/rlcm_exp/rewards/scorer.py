"""The calling side shared by in-process rewards: batch-size check, input checks, chunked scoring
under one lock (rewards/base.py's `score_in_chunks`).

`ChunkedPromptImageReward` subclasses define `scorer(images, prompts)`, `ChunkedImageReward`
subclasses `scorer(images)` (prompts are ignored): the differentiable form. `EmbeddingHeadReward`
is the image-only reward "a head on top of an image embedder" (the aesthetic predictors)."""

from __future__ import annotations

import threading
from typing import Protocol

import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_images, check_prompts, score_in_chunks


class _ChunkedReward:
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


class ChunkedPromptImageReward(_ChunkedReward):
    """A reward of images and their prompts; a subclass defines `scorer(images, prompts)`."""

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


class ChunkedImageReward(_ChunkedReward):
    """A reward of the images alone (prompts are ignored); a subclass defines `scorer(images)`."""

    def scorer(self, images: torch.Tensor) -> torch.Tensor:
        """Differentiable (B,) scores on the model's device."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, self.name)
        return score_in_chunks(
            lambda part: self.scorer(images[part]), len(images), self.batch_size, self._lock
        )


class ImageEmbedder(Protocol):
    """What `EmbeddingHeadReward` needs of its embedder (ClipEmbedder, SiglipImageEmbedder)."""

    @property
    def device(self) -> torch.device: ...

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...


class EmbeddingHeadReward(ChunkedImageReward):
    """score = head(embedder.embed_images(images)); prompts are ignored.

    The head stays float32 whatever the embedder's dtype: it is tiny, and its scores should not
    lose precision to a half-precision embedder (LAION's head was trained in float32; the v2.5
    file holds bfloat16 values).
    """

    def __init__(
        self, embedder: ImageEmbedder, head: torch.nn.Module, batch_size: int, models: dict[str, str]
    ) -> None:
        super().__init__(batch_size, models)
        self.embedder = embedder
        self.head = head.to(embedder.device, torch.float32)

    def scorer(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) float32 scores on the model's device."""
        return self.head(self.embedder.embed_images(images))  # embed_images returns unit-norm rows

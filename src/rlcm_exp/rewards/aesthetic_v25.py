"""Aesthetic Predictor V2.5 (discus0434): a SigLIP so400m/14-384 image embedding into an MLP head;
scores about 1..10 (its authors read 5.5 and above as high quality). Prompts are ignored.

    score = MLP(e / |e|),  e = SiglipVisionModel(pixels).pooler_output (the attention-pooled embedding)
    MLP: hidden-1024-128-64-16-1, dropouts between the linear layers and no activations

The head's state dict has keys `scoring_head.{0,2,4,6,8}.{weight,bias}` (dropouts at 1, 3, 5, 7),
which `AestheticV25Head` reproduces so the public file loads without renaming. It is fetched once
from `head_url` (the authors' repository pinned at a commit), checked against `head_sha256` and
loaded tensors-only, through the same fetch and cache as the LAION head (rewards/aesthetic.py).

Preprocessing is SiglipImageProcessor's, as torch ops: resize to the model's square input
(bicubic; no crop, so other aspect ratios are squashed as the processor does), then
(x - mean) / std. It reads its numbers from the processor config saved beside the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, SiglipVisionModel

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.aesthetic import HeadRewardSettings, head_weights
from rlcm_exp.rewards.hub import HoldsModel, HubSource, load_with_processor, runtime_settings
from rlcm_exp.rewards.scorer import EmbeddingHeadReward
from rlcm_exp.rewards.weights import load_state_into

# the authors' repository pinned at a commit, so the URL cannot move to another file under us
V25_HEAD_URL = (
    "https://raw.githubusercontent.com/discus0434/aesthetic-predictor-v2-5/"
    "c0e15567fa61252cbff43d70c49a8bd27202ca9a/models/aesthetic_predictor_v2_5.pth"
)
V25_HEAD_SHA256 = "a6caf256b3dc434273c98dcb12f6bf17c5d4fc647d8df11f038386923dd06220"  # 2,644,834 bytes


class AestheticV25Head(torch.nn.Module):
    """The v2.5 MLP with the module indices of its public state dict (dropouts at 1, 3, 5, 7)."""

    WIDTHS = (1024, 128, 64, 16, 1)
    DROPOUTS = (0.5, 0.5, 0.5, 0.2)  # after each linear layer but the last

    def __init__(self, embed_dim: int = 1152) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip((embed_dim, *self.WIDTHS), self.WIDTHS, strict=False)):
            if i > 0:
                layers.append(torch.nn.Dropout(self.DROPOUTS[i - 1]))
            layers.append(torch.nn.Linear(n_in, n_out))
        self.scoring_head = torch.nn.Sequential(*layers)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) L2-normalised SigLIP image embeddings -> (B,) scores."""
        return self.scoring_head(embedding).squeeze(-1)


class SquareResizeNormalize(torch.nn.Module):
    """SiglipImageProcessor's resize to a fixed (height, width) and normalise, as differentiable torch ops.

    Input (B, 3, H, W) in [0, 1]; output (B, 3, height, width) normalised.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, image_processor: Any) -> None:
        super().__init__()
        size = image_processor.size
        get = size.get if isinstance(size, Mapping) else lambda name: getattr(size, name, None)
        height, width = get("height"), get("width")
        if height is None or width is None:
            raise ConfigError(f"unsupported image processor size {size!r}: expected height and width")
        self.size = (int(height), int(width))
        mean, std = image_processor.image_mean, image_processor.image_std
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != self.size:
            # bicubic with antialias is what the processor's PIL bicubic resize amounts to
            x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std


class SiglipImageEmbedder(HoldsModel, torch.nn.Module):
    """A transformers SiglipVisionModel + its preprocessing: images to L2-normalised pooled embeddings."""

    def __init__(self, model: SiglipVisionModel, image_processor: Any) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = SquareResizeNormalize(image_processor)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, hidden_size) float32, unit norm. Differentiable in `images`."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        pooled = self.model(pixel_values=pixels).pooler_output
        return F.normalize(pooled.float(), dim=-1)


class AestheticV25Reward(EmbeddingHeadReward):
    """reward(images, prompts) -> (B,) Aesthetic Predictor V2.5 scores; prompts are ignored.

    `scorer(images)` is the differentiable form. Calls are serialised by a lock: thread-safe, and
    one forward at a time bounds accelerator memory.
    """

    name = "aesthetic_v25"
    embedder: SiglipImageEmbedder
    head: AestheticV25Head


def load_v25_head(path: Path, embed_dim: int) -> AestheticV25Head:
    """The v2.5 MLP for `embed_dim`-wide embeddings with the weights of `path` (torch file or safetensors)."""
    return load_state_into(AestheticV25Head(embed_dim), path, "the Aesthetic Predictor V2.5 head")


def aesthetic_v25(
    siglip_model_id: str | None = "google/siglip-so400m-patch14-384",
    siglip_revision: str = "main",
    siglip_local_path: str | None = None,
    **settings: Unpack[HeadRewardSettings],
) -> AestheticV25Reward:
    """The Aesthetic Predictor V2.5 reward: SigLIP pooled image embedding -> L2 norm -> MLP head."""
    dtype, device, batch_size = runtime_settings(settings, declared=HeadRewardSettings)
    path, head_source = head_weights(settings, V25_HEAD_URL, V25_HEAD_SHA256)
    siglip = HubSource(siglip_model_id, siglip_revision, siglip_local_path, "reward.siglip_")
    model, processor, siglip_source = load_with_processor(
        SiglipVisionModel.from_pretrained, AutoImageProcessor.from_pretrained, siglip, dtype
    )
    embedder = SiglipImageEmbedder(model, processor).to(device)
    head = load_v25_head(path, int(model.config.hidden_size))
    return AestheticV25Reward(
        embedder, head, batch_size, {"siglip": siglip_source, "aesthetic_head": head_source}
    )

"""CLIP-family rewards: CLIP score and PickScore, plus the loading and preprocessing they share.

Both score how well an image matches its prompt, in-process and far cheaper than the LLaVA +
BERTScore server. Images stay torch tensors in [0, 1] from the sampler to the model: resize,
center crop and CLIP normalisation are torch ops (no PIL round trip), so the path from pixels to
score is differentiable and runs on whatever device the images and model are on.

    clip_score:  cosine(image embedding, text embedding) of openai/clip-vit-large-patch14, in [-1, 1]
    pickscore:   logit_scale * cosine of yuvalkirstain/PickScore_v1 (about 15..25 for typical images)

`ClipEmbedder` and `load_clip_embedder` are also what the aesthetic reward uses; every model-based
reward loads through rewards/hub.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.hub import HoldsModel, HubSource, ModelRuntime, runtime_settings, torch_dtype
from rlcm_exp.rewards.scorer import ChunkedPromptImageReward


def _side(size: Any, name: str) -> int | None:
    """Read one field of an image processor's size dict (a plain dict before transformers 5, a SizeDict after)."""
    if size is None:
        return None
    value = size.get(name) if isinstance(size, Mapping) else getattr(size, name, None)
    return int(value) if value is not None else None


class ClipImagePreprocess(torch.nn.Module):
    """CLIPImageProcessor's resize-shortest-side, center-crop and normalise, as differentiable torch ops.

    Reads its numbers from the model's own image processor config, so a model with another input
    size or mean/std (PickScore's ViT-H, a tiny test model) is preprocessed like its processor
    would. Input (B, 3, H, W) in [0, 1]; output (B, 3, crop, crop) normalised.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, image_processor: Any) -> None:
        super().__init__()
        size, crop = image_processor.size, getattr(image_processor, "crop_size", None)
        shortest = _side(size, "shortest_edge")
        height, width = _side(crop, "height"), _side(crop, "width")
        if shortest is None:  # processors that resize to a fixed square instead
            shortest = _side(size, "height")
        if shortest is None:
            raise ConfigError(f"unsupported image processor size {size!r}: expected shortest_edge or height")
        self.shortest = shortest
        self.crop = (height or shortest, width or shortest)
        self.register_buffer(
            "mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        scale = self.shortest / min(h, w)
        new_h, new_w = max(self.crop[0], round(h * scale)), max(self.crop[1], round(w * scale))
        x = images.float()
        if (new_h, new_w) != (h, w):
            # bicubic with antialias is what the PIL resize in CLIP's processor amounts to
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        top, left = (new_h - self.crop[0]) // 2, (new_w - self.crop[1]) // 2
        x = x[..., top : top + self.crop[0], left : left + self.crop[1]].clamp(0, 1)
        return (x - self.mean) / self.std


class ClipEmbedder(HoldsModel, torch.nn.Module):
    """A transformers CLIPModel + its preprocessing: images and prompts to L2-normalised embeddings."""

    def __init__(self, model: CLIPModel, image_processor: Any, tokenizer: Any = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = ClipImagePreprocess(image_processor)
        self.tokenizer = tokenizer

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, projection_dim) float32, unit norm. Differentiable in `images`."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        # vision_model + visual_projection rather than get_image_features: the latter's return type
        # changed between transformers 4 and 5 (tensor vs model output)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """B prompts -> (B, projection_dim) float32, unit norm; prompts longer than the model's context are truncated."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipEmbedder was built without a tokenizer")
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)


def load_clip_embedder(
    model: HubSource,
    processor: HubSource | None = None,
    with_tokenizer: bool = True,
    dtype: str = "float32",
    device: str = "cpu",
) -> ClipEmbedder:
    """Load a CLIPModel and its image processor (and tokenizer); the processor may live in another repo.

    PickScore ships only the model; its processor is the LAION ViT-H one, hence the separate
    processor source. With no processor source given (None, or neither its id nor its folder set),
    the model's own repo supplies it.
    """
    if processor is None or (processor.model_id is None and processor.local_path is None):
        processor = model
    clip = model.load(CLIPModel.from_pretrained, dtype=torch_dtype(dtype))
    image_processor = processor.load(AutoImageProcessor.from_pretrained)
    tokenizer = processor.load(AutoTokenizer.from_pretrained) if with_tokenizer else None
    return ClipEmbedder(clip, image_processor, tokenizer).to(device)


class ClipAlignmentReward(ChunkedPromptImageReward):
    """reward(images, prompts) = scale * cosine(image, prompt) per image, in `batch_size` chunks.

    A lock serialises calls: the trainer scores in a worker thread, and one model forward at a
    time bounds accelerator memory. `scorer(images, prompts)` is the differentiable form.
    """

    name = "ClipAlignmentReward"

    def __init__(
        self, embedder: ClipEmbedder, scale: float | None, batch_size: int, models: dict[str, str]
    ) -> None:
        super().__init__(batch_size, models)
        self.embedder = embedder
        self.scale = scale

    def scorer(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable scores (B,) float32 on the model's device."""
        image_emb = self.embedder.embed_images(images)
        text_emb = self.embedder.embed_texts(prompts)
        cosine = (image_emb * text_emb).sum(-1)
        # None = the model's own learned temperature (PickScore's definition)
        scale = self.embedder.model.logit_scale.exp().float() if self.scale is None else self.scale
        return cosine * scale


def clip_score(
    model_id: str | None = "openai/clip-vit-large-patch14",
    revision: str = "main",
    local_path: str | None = None,
    scale: float = 1.0,
    **runtime: Unpack[ModelRuntime],
) -> ClipAlignmentReward:
    """CLIP score: scale * cosine similarity of the CLIP image and prompt embeddings (scale 1: in [-1, 1])."""
    dtype, device, batch_size = runtime_settings(runtime)
    clip = HubSource(model_id, revision, local_path)
    embedder = load_clip_embedder(clip, dtype=dtype, device=device)
    return ClipAlignmentReward(embedder, scale, batch_size, {"clip": clip.describe()})


def pickscore(
    model_id: str | None = "yuvalkirstain/PickScore_v1",
    revision: str = "main",
    local_path: str | None = None,
    processor_id: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    processor_revision: str = "main",
    processor_local_path: str | None = None,
    **runtime: Unpack[ModelRuntime],
) -> ClipAlignmentReward:
    """PickScore: the model's logit_scale (about 100) * cosine of image and prompt embeddings."""
    dtype, device, batch_size = runtime_settings(runtime)
    model = HubSource(model_id, revision, local_path)
    processor = HubSource(processor_id, processor_revision, processor_local_path, "reward.processor_")
    embedder = load_clip_embedder(model, processor, dtype=dtype, device=device)
    models = {"pickscore": model.describe(), "processor": processor.describe()}
    return ClipAlignmentReward(embedder, None, batch_size, models)

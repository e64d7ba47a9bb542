"""ImageReward v1.0 (Xu et al. 2023): a BLIP image-grounded text encoder with an MLP head, trained
on human rankings of generated images; about -2..2 (standardised over its training set).

    f = BERT-with-cross-attention(prompt tokens, BLIP ViT(pixels) tokens)[CLS]
    score = (MLP(f) - 0.16717362830052426) / 1.0333394966054072

The ImageReward package pins an old transformers, so its weights are loaded here into current
transformers classes: the BLIP ViT-L/16 (`blip.visual_encoder.*`) into BlipVisionModel (keys
renamed: blocks -> encoder.layers, attn.proj -> self_attn.projection, norm -> post_layernorm, ...;
LayerNorm eps 1e-6 as BLIP's), the text encoder (`blip.text_encoder.*`, BLIP's med.py BERT) into
BlipTextModel (same key names; run bidirectionally with cross-attention to every image token), and
the MLP (`mlp.layers.*`, LAION's 768-1024-128-64-16-1 layout) into rewards/aesthetic.py's head.

Prompts are tokenised as ImageReward does: bert-base-uncased with [DEC] and [ENC] added, padded
to 35 tokens, truncated there. Images are preprocessed as its `_transform(224)`: shortest side
to 224 (bicubic), center crop, CLIP's mean and std, as torch ops (rewards/clip.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Unpack

import torch
from transformers import (
    AutoTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPImageProcessor,
)

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.aesthetic import AestheticHead
from rlcm_exp.rewards.clip import ClipImagePreprocess
from rlcm_exp.rewards.hub import (
    HoldsModel,
    ModelRuntime,
    describe_hub_file,
    describe_source,
    load_pretrained,
    runtime_settings,
    torch_dtype,
)
from rlcm_exp.rewards.scorer import ChunkedPromptImageReward
from rlcm_exp.rewards.weights import hub_file, load_state_into

# the standardisation ImageReward applies to the MLP's output (ImageReward.py, class ImageReward)
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35  # ImageReward's padding and truncation length
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP "large" (ViT-L/16 at 224) as ImageReward builds it: BLIP_Pretrain(image_size=224, vit="large")
IMAGEREWARD_VIT: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "layer_norm_eps": 1e-6,
}
# BLIP's ViT key names -> BlipVisionModel's (after the "blip.visual_encoder." prefix is removed)
_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]
_TEXT_CONFIG_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
]


def _vit_key(key: str) -> str:
    for pattern, replacement in _VIT_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def rename_imagereward_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """ImageReward.pt's keys -> ImageRewardModel's; what the reward does not use (the contrastive
    projections, the text position_ids buffer) is dropped."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            out["vision." + _vit_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("embeddings.position_ids"):
            out["text." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            out[key] = value
    return out


class ImageRewardModel(torch.nn.Module):
    """BLIP vision tower + image-grounded text encoder + MLP: (pixels, tokens) -> (B,) MLP outputs."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticHead(text_config.hidden_size)  # ImageReward's MLP has LAION's layout

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
        )
        return self.mlp(text.last_hidden_state[:, 0].float())


def text_config_from_med(path: Path, vision_width: int) -> BlipTextConfig:
    """BLIP's med_config.json (a BertConfig with cross-attention) as a BlipTextConfig."""
    try:
        med = json.loads(path.read_text())
        fields = {k: med[k] for k in _TEXT_CONFIG_KEYS if k in med}
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"the ImageReward text config {path} is not BLIP's med_config.json: {err}") from err
    return BlipTextConfig(**fields, encoder_hidden_size=vision_width, is_decoder=True)


class ImageRewardScorer(HoldsModel, ChunkedPromptImageReward):
    """reward(images, prompts) -> (B,) ImageReward scores: (MLP(f) - mean) / std."""

    name = "imagereward"

    def __init__(
        self, model: ImageRewardModel, tokenizer: Any, batch_size: int, models: dict[str, str]
    ) -> None:
        super().__init__(batch_size, models)
        self.model = model
        self.model.mlp.float()  # the head stays float32 whatever the BLIP dtype
        side = model.vision.config.image_size
        size = side if isinstance(side, int) else side[0]  # BLIP's ViT takes square inputs
        processor = CLIPImageProcessor(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(OPENAI_MEAN),
            image_std=list(OPENAI_STD),
        )
        self.preprocess = ClipImagePreprocess(processor).to(self.device)
        self.tokenizer = tokenizer

    def scorer(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable scores (B,) float32 on the model's device."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        ).to(self.device)
        raw = self.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_blip_tokenizer(model_id: str | None, revision: str, local_path: str | None) -> Any:
    """The BERT tokenizer with the two tokens BLIP adds ([DEC] as bos, [ENC]), as ImageReward's init_tokenizer."""
    tokenizer = load_pretrained(
        AutoTokenizer.from_pretrained,
        model_id=model_id,
        revision=revision,
        local_path=local_path,
        key="reward.tokenizer_",
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def imagereward(
    model_id: str | None = "THUDM/ImageReward",
    revision: str = "main",
    local_path: str | None = None,
    checkpoint_file: str = "ImageReward.pt",
    checkpoint_sha256: str | None = None,
    med_config_file: str = "med_config.json",
    vision: Mapping[str, Any] | None = None,
    tokenizer_model_id: str | None = "google-bert/bert-base-uncased",
    tokenizer_revision: str = "main",
    tokenizer_local_path: str | None = None,
    **runtime: Unpack[ModelRuntime],
) -> ImageRewardScorer:
    """ImageReward v1.0: BLIP image-grounded [CLS] feature -> MLP -> standardised with ImageReward's mean and std."""
    dtype, device, batch_size = runtime_settings(runtime, batch_size=16)
    where: dict[str, Any] = {
        "model_id": model_id,
        "revision": revision,
        "local_path": local_path,
        "key": "reward.",
    }
    checkpoint = hub_file(**where, filename=checkpoint_file, sha256=checkpoint_sha256)
    vision_config = BlipVisionConfig(**dict(vision or IMAGEREWARD_VIT))
    text_config = text_config_from_med(
        hub_file(**where, filename=med_config_file, sha256=None), vision_config.hidden_size
    )
    model = ImageRewardModel(vision_config, text_config)
    load_state_into(model, checkpoint, "the ImageReward checkpoint", rename=rename_imagereward_state)
    tokenizer = load_blip_tokenizer(tokenizer_model_id, tokenizer_revision, tokenizer_local_path)
    if len(tokenizer) > text_config.vocab_size:
        raise ConfigError(
            f"reward.tokenizer_model_id={tokenizer_model_id} has {len(tokenizer)} tokens with [DEC] and [ENC], "
            f"more than the text encoder's {text_config.vocab_size}: not the tokenizer ImageReward was trained with."
        )
    model = model.to(device, torch_dtype(dtype))
    models = {
        "imagereward": describe_hub_file(model_id, revision, local_path, checkpoint_file, checkpoint_sha256),
        "tokenizer": describe_source(tokenizer_model_id, tokenizer_revision, tokenizer_local_path),
    }
    return ImageRewardScorer(model, tokenizer, batch_size, models)

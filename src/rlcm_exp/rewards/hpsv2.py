"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023): an OpenCLIP ViT-H/14 fine-tuned on human
preferences between generated images.

    score = scale * cosine(encode_image(pixels), encode_text(tokens))

`scale` 1 is what the hpsv2 package's `score()` returns (the diagonal of image_features @
text_features.T of the L2-normalised features, about 0.2..0.35 for typical images); 100 gives the
form its benchmark tables print. The model is open_clip's own `ViT-H-14` architecture (open_clip
ships its config and tokenizer, nothing is downloaded for them) with every weight replaced by the
HPS checkpoint's `state_dict`, as hpsv2 does; the LAION base weights are not needed.

The checkpoint is one file of the hub repo `xswu/HPSv2` fetched by hub id and revision (or found
in a local folder), checked against `hps_sha256` when that is set, and loaded tensors-only.

Preprocessing is hpsv2's evaluation transform, as torch ops on the [0, 1] images: resize the
longest side to the model's input size (bicubic, antialiased: torchvision's tensor resize), pad
the short side with zeros centred, then (x - mean) / std with the model's (OpenAI) mean and std.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Unpack

import torch
import torch.nn.functional as F

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.hub import HoldsModel, ModelRuntime, describe_hub_file, runtime_settings, torch_dtype
from rlcm_exp.rewards.scorer import ChunkedPromptImageReward
from rlcm_exp.rewards.weights import hub_file, load_state_into


class LongestSidePadNormalize(torch.nn.Module):
    """hpsv2's evaluation transform: longest side to `size`, zero padding centred, normalise.

    Input (B, 3, H, W) in [0, 1]; output (B, 3, size, size). Differentiable in the images.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, size: int, mean: Any, std: Any) -> None:
        super().__init__()
        self.size = int(size)
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        if scale != 1.0:
            new_h, new_w = round(h * scale), round(w * scale)
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            pad_h, pad_w = self.size - new_h, self.size - new_w
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
        return (x - self.mean) / self.std


class HpsReward(HoldsModel, ChunkedPromptImageReward):
    """reward(images, prompts) -> (B,) HPS: scale * cosine of the OpenCLIP image and prompt features."""

    name = "hpsv2"

    def __init__(
        self,
        model: Any,
        tokenizer: Callable[..., torch.Tensor],
        scale: float,
        batch_size: int,
        models: dict[str, str],
    ) -> None:
        super().__init__(batch_size, models)
        self.model = model
        cfg = model.visual.preprocess_cfg
        size = model.visual.image_size
        self.preprocess = LongestSidePadNormalize(
            size[0] if isinstance(size, tuple | list) else size, cfg["mean"], cfg["std"]
        ).to(self.device)
        self.tokenizer = tokenizer
        self.scale = scale

    def scorer(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Differentiable scores (B,) float32 on the model's device."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        tokens = self.tokenizer(prompts).to(self.device)  # truncated to the context length, EOT kept last
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return self.scale * (image * text).sum(-1)


def load_open_clip(model_name: str, checkpoint: Path, dtype: str, device: str) -> tuple[Any, Any]:
    """open_clip's `model_name` architecture (no weights fetched) with the HPS checkpoint's state_dict."""
    try:
        import open_clip
    except ImportError as err:
        raise ConfigError(
            "reward=hpsv2 needs open_clip: pip install -e '.[rewards]' (or pip install open_clip_torch)"
        ) from err
    if model_name not in open_clip.list_models():
        raise ConfigError(f"reward.model_name={model_name} is not an open_clip architecture (e.g. ViT-H-14)")
    model = open_clip.create_model(model_name, pretrained=None, device="cpu")
    model = load_state_into(model, checkpoint, "the HPS checkpoint", entry="state_dict")
    return model.to(device, torch_dtype(dtype)), open_clip.get_tokenizer(model_name)


def hpsv2(
    model_name: str = "ViT-H-14",
    hps_model_id: str | None = "xswu/HPSv2",
    hps_revision: str = "main",
    hps_local_path: str | None = None,
    hps_file: str = "HPS_v2.1_compressed.pt",
    hps_sha256: str | None = None,
    scale: float = 1.0,
    **runtime: Unpack[ModelRuntime],
) -> HpsReward:
    """The HPSv2.1 reward: scale * cosine(image, prompt) of OpenCLIP ViT-H/14 with the HPS v2.1 weights."""
    dtype, device, batch_size = runtime_settings(runtime, batch_size=16)
    path = hub_file(hps_model_id, hps_revision, hps_local_path, hps_file, hps_sha256, key="reward.hps_")
    model, tokenizer = load_open_clip(model_name, path, dtype, device)
    source = describe_hub_file(hps_model_id, hps_revision, hps_local_path, hps_file, hps_sha256)
    models = {"hps": f"{model_name} + {source}"}
    return HpsReward(model, tokenizer, scale, batch_size, models)

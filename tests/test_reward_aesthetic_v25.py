"""reward=aesthetic_v25 on a tiny SigLIP built from a config, saved in the hub layout and loaded back
by from_pretrained, with a random head saved the way the public file is (bfloat16 tensors under
`scoring_head.*`): the scores equal Aesthetic Predictor V2.5's formula computed independently
(SiglipImageProcessor -> SiglipVisionModel pooler -> / norm -> the MLP), and the package's own
model class where the package is importable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipVisionModel

from rlcm_exp import configs
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.aesthetic_v25 import AestheticV25Head, aesthetic_v25
from rlcm_exp.rewards.base import build_reward

SIZE = 32
# the public head file's tensors (checked on the real file): a 1152-wide SigLIP so400m embedding in
REAL_HEAD = {"0": (1024, 1152), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "8": (1, 16)}


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> Path:
    """A whole SiglipModel (as the hub repo holds) with 32-d insides and a 32 x 32 processor."""
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    text = dict(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    text |= dict(max_position_embeddings=8, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=SIZE, patch_size=8)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(folder)
    # the real processor's settings: bicubic resize to a square, mean = std = 0.5
    SiglipImageProcessor(size={"height": SIZE, "width": SIZE}, resample=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    """A random head for 32-d embeddings, saved as the public file is: bfloat16, scoring_head.* keys."""
    torch.manual_seed(1)
    state = {k: v.to(torch.bfloat16) for k, v in AestheticV25Head(32).state_dict().items()}
    path = tmp_path_factory.mktemp("head") / "aesthetic_predictor_v2_5.pth"
    torch.save(state, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def images(n: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    """8-bit values, so the processor's PIL path sees exactly the same pixels."""
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]


def reference_scores(folder: Path, head_path: Path, x: torch.Tensor) -> torch.Tensor:
    """The V2.5 formula written out: processor, vision tower's pooler output, divide by its norm, MLP."""
    model = SiglipVisionModel.from_pretrained(folder).eval()
    pixels = SiglipImageProcessor.from_pretrained(folder)(images=to_pil(x), return_tensors="pt")[
        "pixel_values"
    ]
    state = torch.load(head_path, weights_only=True)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(32, 1024),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(64, 16),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 1),
    ).eval()
    mlp.load_state_dict({k.removeprefix("scoring_head."): v for k, v in state.items()})
    with torch.no_grad():
        embeds = model(pixel_values=pixels).pooler_output
        return mlp(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)


def test_head_has_the_public_files_keys_and_shapes():
    state = AestheticV25Head(1152).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items() if k.endswith("weight")} == {
        f"scoring_head.{i}.weight": shape for i, shape in REAL_HEAD.items()
    }
    assert len(state) == 10


def test_scores_equal_the_v25_formula_on_the_same_tiny_weights(tiny_siglip, head_file):
    reward = aesthetic_v25(
        siglip_local_path=str(tiny_siglip),
        head_local_path=str(head_file),
        head_sha256=sha256(head_file),
        batch_size=2,
    )
    x = images(3)
    scores = reward(x, ["ignored"] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    expected = reference_scores(tiny_siglip, head_file, x)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.std() > 1e-3  # the images are told apart: the comparison is not of constants
    assert reward.models["siglip"] == f"{tiny_siglip} (local)"


def test_scores_equal_the_packages_own_model(tiny_siglip, head_file):
    package = pytest.importorskip("aesthetic_predictor_v2_5")
    model = package.AestheticPredictorV2_5Model.from_pretrained(tiny_siglip).eval()
    model.layers.load_state_dict(torch.load(head_file, weights_only=True))
    x = images(2, seed=3)
    pixels = package.AestheticPredictorV2_5Processor.from_pretrained(tiny_siglip)(
        images=to_pil(x), return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.squeeze(-1)
    reward = aesthetic_v25(
        siglip_local_path=str(tiny_siglip), head_local_path=str(head_file), head_sha256=None
    )
    torch.testing.assert_close(reward(x, ["", ""]), expected, atol=1e-5, rtol=0)


def test_other_sizes_are_resized_and_gradients_reach_the_pixels(tiny_siglip, head_file):
    reward = aesthetic_v25(
        siglip_local_path=str(tiny_siglip), head_local_path=str(head_file), head_sha256=None
    )
    x = images(2, size=48).requires_grad_(True)
    scores = reward.scorer(x)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # a smooth 48 x 48 image scores close to the processor's PIL-resized path
    smooth = torch.nn.functional.interpolate(images(1, size=6), (48, 48), mode="bilinear")
    smooth = (smooth * 255).round() / 255
    expected = reference_scores(tiny_siglip, head_file, smooth)
    torch.testing.assert_close(reward(smooth, [""]), expected, atol=0.05, rtol=0)


def test_wrong_head_files_are_config_errors(tiny_siglip, head_file, tmp_path):
    with pytest.raises(ConfigError, match="has sha256"):
        aesthetic_v25(
            siglip_local_path=str(tiny_siglip), head_local_path=str(head_file), head_sha256="0" * 64
        )
    wide = tmp_path / "wide.pth"
    torch.save(AestheticV25Head(1152).state_dict(), wide)  # the real head on a 32-d tiny SigLIP
    with pytest.raises(ConfigError, match=r"scoring_head\.0\.weight \(1024, 32\)"):
        aesthetic_v25(siglip_local_path=str(tiny_siglip), head_local_path=str(wide), head_sha256=None)
    with pytest.raises(ConfigError, match=r"reward\.siglip_local_path=/no/such: no such folder"):
        aesthetic_v25(siglip_local_path="/no/such", head_local_path=str(head_file), head_sha256=None)


def test_the_yaml_pins_the_real_head_and_builds_offline(tiny_siglip, head_file, monkeypatch):
    cfg = OmegaConf.load(configs.conf_dir() / "reward" / "aesthetic_v25.yaml")
    assert cfg.siglip_model_id == "google/siglip-so400m-patch14-384"
    assert "discus0434/aesthetic-predictor-v2-5/c0e15567" in cfg.head_url and len(cfg.head_sha256) == 64
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"set reward\.siglip_local_path="):
        aesthetic_v25(head_local_path=str(head_file), head_sha256=None)
    cfg.siglip_local_path, cfg.head_local_path, cfg.head_sha256 = str(tiny_siglip), str(head_file), None
    reward = build_reward(cfg, "cpu")
    assert reward(images(1), [""]).shape == (1,)

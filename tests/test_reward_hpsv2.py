"""reward=hpsv2 on a tiny OpenCLIP model built from a custom open_clip config with random weights,
saved as the HPS checkpoint is ({"state_dict": ...} in a folder as in the hub repo) and loaded back:
the scores equal hpsv2's formula computed independently on the same weights (its evaluation
transform written with torchvision: ToTensor, tensor resize of the longest side, zero padding,
Normalize; then open_clip's own encode_image / encode_text, normalised, and their dot product)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import functional as TF

from rlcm_exp import configs
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import build_reward
from rlcm_exp.rewards.hpsv2 import hpsv2

open_clip = pytest.importorskip("open_clip")

TINY = "rlcm-test-tiny-vit"
FILE = "HPS_v2.1_compressed.pt"
PROMPTS = ["a cat riding a bike", "a dog playing chess", "a bird"]


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    """A ViT-H-14-shaped open_clip config (same tokenizer and context) with 32-wide insides, registered by name."""
    path = tmp_path_factory.mktemp("arch") / f"{TINY}.json"
    vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(path)
    other = path.with_name(
        f"{TINY}-other.json"
    )  # the same with another embedding width: a wrong architecture
    other.write_text(json.dumps({"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}))
    open_clip.add_model_config(other)
    return TINY


@pytest.fixture(scope="module")
def hps_folder(tmp_path_factory, tiny_arch) -> Path:
    """Random weights saved as HPS's compressed checkpoint is: the model's state_dict under "state_dict"."""
    torch.manual_seed(0)
    model = open_clip.create_model(tiny_arch, pretrained=None)
    folder = tmp_path_factory.mktemp("hps")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, folder / FILE)
    return folder


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """8-bit values, so the PIL path of the reference sees exactly the same pixels."""
    return (torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def hps_transform(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """hpsv2's preprocess_val (light_augmentation): ToTensor, ResizeMaxSize(size, fill=0), Normalize."""
    x = TF.to_tensor(image.convert("RGB"))
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new = [round(d * scale) for d in (height, width)]
        x = TF.resize(x, new, TF.InterpolationMode.BICUBIC)
        pad_h, pad_w = size - new[0], size - new[1]
        x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, mean, std)


def reference_scores(arch: str, folder: Path, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    model = open_clip.create_model(arch, pretrained=None).eval()
    model.load_state_dict(torch.load(folder / FILE, weights_only=True)["state_dict"])
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    pil = [Image.fromarray(a) for a in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    pixels = torch.stack([hps_transform(p, 32, mean, std) for p in pil])
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(open_clip.get_tokenizer(arch)(prompts), normalize=True)
        return torch.diagonal(image @ text.T)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (48, 40), (24, 64)])
def test_scores_equal_hpsv2s_formula_on_the_same_tiny_weights(tiny_arch, hps_folder, h, w):
    reward = hpsv2(model_name=tiny_arch, hps_local_path=str(hps_folder), batch_size=2)
    x = images(3, h, w, seed=h + w)
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    expected = reference_scores(tiny_arch, hps_folder, x, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1 and scores.std() > 1e-4


def test_scale_gradients_and_long_prompts(tiny_arch, hps_folder):
    plain = hpsv2(model_name=tiny_arch, hps_local_path=str(hps_folder))
    hundred = hpsv2(model_name=tiny_arch, hps_local_path=str(hps_folder), scale=100.0)
    x = images(2, 32, 32)
    long = ["a cat " * 100, "a bird"]  # past the 77-token context: truncated, not an error
    torch.testing.assert_close(hundred(x, long), 100 * plain(x, long), atol=1e-4, rtol=0)
    x.requires_grad_(True)
    plain.scorer(x, long).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_checkpoint_pin_and_layout_errors(tiny_arch, hps_folder, tmp_path):
    digest = hashlib.sha256((hps_folder / FILE).read_bytes()).hexdigest()
    pinned = hpsv2(model_name=tiny_arch, hps_local_path=str(hps_folder), hps_sha256=digest)
    assert pinned.models["hps"].endswith(f"sha256={digest}")
    with pytest.raises(ConfigError, match=r"reward\.hps_sha256=0{64}"):
        hpsv2(model_name=tiny_arch, hps_local_path=str(hps_folder), hps_sha256="0" * 64)
    with pytest.raises(ConfigError, match=f"no {FILE} in this folder"):
        hpsv2(model_name=tiny_arch, hps_local_path=str(tmp_path))
    torch.save(torch.load(hps_folder / FILE, weights_only=True)["state_dict"], tmp_path / FILE)
    with pytest.raises(ConfigError, match="no 'state_dict' state dict"):
        hpsv2(model_name=tiny_arch, hps_local_path=str(tmp_path))
    with pytest.raises(ConfigError, match="does not fit"):
        hpsv2(model_name=f"{tiny_arch}-other", hps_local_path=str(hps_folder))
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        hpsv2(model_name="no-such-arch", hps_local_path=str(hps_folder))


def test_the_yaml_names_the_real_checkpoint_and_builds_offline(tiny_arch, hps_folder, monkeypatch):
    cfg = OmegaConf.load(configs.conf_dir() / "reward" / "hpsv2.yaml")
    assert (cfg.model_name, cfg.hps_model_id, cfg.hps_file) == ("ViT-H-14", "xswu/HPSv2", FILE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"set reward\.hps_local_path="):
        hpsv2(model_name=tiny_arch)
    assert (cfg.hps_revision, cfg.hps_sha256) == (  # pins quoted from the hub (see the YAML comments)
        "697403c78157020a1ae59d23f111aa58ced35b0a",
        "c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837",
    )
    # the tiny file is not the pinned one: refused
    tiny = OmegaConf.merge(cfg, {"model_name": tiny_arch, "hps_local_path": str(hps_folder)})
    with pytest.raises(ConfigError, match=r"reward\.hps_sha256=c57a38fb"):
        build_reward(tiny, "cpu")
    cfg.model_name, cfg.hps_local_path, cfg.hps_sha256 = tiny_arch, str(hps_folder), None
    reward = build_reward(cfg, "cpu")
    assert reward(images(1, 32, 32), ["a cat"]).shape == (1,)

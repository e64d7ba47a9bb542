"""reward=imagereward on tiny random weights saved in ImageReward.pt's own key layout (BLIP's
`blip.visual_encoder.*` / `blip.text_encoder.*` and `mlp.layers.*`, plus keys the reward ignores)
with a med_config.json beside it, as the hub repo holds them. The scores equal ImageReward's
formula computed independently: BLIP's ViT and its med.py BERT with cross-attention written out
below in plain torch on the original keys (no transformers classes), the [CLS] feature into the
MLP, then (x - mean) / std."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms import functional as TF
from transformers import BertTokenizer

from rlcm_exp import configs
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import build_reward
from rlcm_exp.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, imagereward

WORDS = ["a", "an", "the", "cat", "dog", "bird", "riding", "bike", "playing", "chess", "red", "photo"]
PROMPTS = ["a cat riding a bike", "a dog playing chess", "the red bird"]
VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 128}
VIT |= {"num_hidden_layers": 2, "num_attention_heads": 2, "layer_norm_eps": 1e-6}
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS, TEXT_FFN = 24, 2, 2, 48


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertTokenizer(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    ids = BertTokenizer.from_pretrained(folder)(PROMPTS[0])["input_ids"]
    assert ids == [2] + [vocab[w] for w in PROMPTS[0].split()] + [3]  # the words are known, not [UNK]
    return folder


def vit_shapes(d: int, ffn: int, layers: int, patch: int, tokens: int) -> dict[str, tuple[int, ...]]:
    """BLIP vit.py's VisionTransformer parameters, by their names in ImageReward.pt."""
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d)}
    shapes |= {"patch_embed.proj.weight": (d, 3, patch, patch), "patch_embed.proj.bias": (d,)}
    for i in range(layers):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
        }
        shapes |= {b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)}
        shapes |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        shapes |= {b + "mlp.fc1.weight": (ffn, d), b + "mlp.fc1.bias": (ffn,)}
        shapes |= {b + "mlp.fc2.weight": (d, ffn), b + "mlp.fc2.bias": (d,)}
    return shapes | {"norm.weight": (d,), "norm.bias": (d,)}


def bert_shapes(
    vocab: int, h: int, ffn: int, layers: int, enc: int, positions: int
) -> dict[str, tuple[int, ...]]:
    """BLIP med.py's BertModel (add_pooling_layer=False) parameters, by their names in ImageReward.pt."""
    shapes: dict[str, tuple[int, ...]] = {"embeddings.word_embeddings.weight": (vocab, h)}
    shapes |= {"embeddings.position_embeddings.weight": (positions, h)}
    shapes |= {"embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,)}
    for i in range(layers):
        b = f"encoder.layer.{i}."
        for part, width in (("attention", h), ("crossattention", enc)):
            shapes |= {f"{b}{part}.self.query.weight": (h, h), f"{b}{part}.self.query.bias": (h,)}
            for kv in ("key", "value"):
                shapes |= {f"{b}{part}.self.{kv}.weight": (h, width), f"{b}{part}.self.{kv}.bias": (h,)}
            shapes |= {f"{b}{part}.output.dense.weight": (h, h), f"{b}{part}.output.dense.bias": (h,)}
            shapes |= {f"{b}{part}.output.LayerNorm.weight": (h,), f"{b}{part}.output.LayerNorm.bias": (h,)}
        shapes |= {b + "intermediate.dense.weight": (ffn, h), b + "intermediate.dense.bias": (ffn,)}
        shapes |= {b + "output.dense.weight": (h, ffn), b + "output.dense.bias": (h,)}
        shapes |= {b + "output.LayerNorm.weight": (h,), b + "output.LayerNorm.bias": (h,)}
    return shapes


def random_tensors(
    shapes: dict[str, tuple[int, ...]], prefix: str, gen: torch.Generator, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        is_norm_weight = ("norm" in name.lower()) and name.endswith("weight")
        out[prefix + name] = 1 + 0.1 * x if is_norm_weight else scale * x
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tokenizer_dir) -> Path:
    """A folder laid out as THUDM/ImageReward: ImageReward.pt (a state dict) and med_config.json."""
    folder = tmp_path_factory.mktemp("imagereward")
    vocab = len(BertTokenizer.from_pretrained(tokenizer_dir)) + 2  # + [DEC], [ENC], as 30522 + 2 = 30524
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": TEXT_WIDTH}
    med |= {"intermediate_size": TEXT_FFN, "layer_norm_eps": 1e-12, "max_position_embeddings": 40}
    med |= {"model_type": "bert", "num_attention_heads": TEXT_HEADS, "num_hidden_layers": TEXT_LAYERS}
    med |= {
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab,
        "encoder_width": 32,
        "add_cross_attention": True,
    }
    (folder / "med_config.json").write_text(json.dumps(med))
    gen = torch.Generator().manual_seed(0)
    state = random_tensors(vit_shapes(32, 128, 2, 8, 17), "blip.visual_encoder.", gen)
    state |= random_tensors(
        bert_shapes(vocab, TEXT_WIDTH, TEXT_FFN, TEXT_LAYERS, 32, 40), "blip.text_encoder.", gen
    )
    head = {"0": (1024, TEXT_WIDTH), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}
    for i, shape in head.items():
        # smaller weights in the head: scores of order 1, as ImageReward's standardised ones are
        state |= random_tensors(
            {f"layers.{i}.weight": shape, f"layers.{i}.bias": shape[:1]}, "mlp.", gen, 0.08
        )
    # what ImageReward.pt also holds and the reward does not use
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).unsqueeze(0)
    state |= random_tensors({"vision_proj.weight": (256, 32), "vision_proj.bias": (256,)}, "blip.", gen)
    state |= random_tensors({"text_proj.weight": (256, TEXT_WIDTH), "text_proj.bias": (256,)}, "blip.", gen)
    torch.save(state, folder / "ImageReward.pt")
    return folder


# ----------------------------------------------------------------------------- the reference, in plain torch


def attend(q_in, kv_in, w, prefix, heads, mask=None):
    """med.py's BertSelfAttention: scores / sqrt(head size), additive mask, softmax, context."""

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q = split(F.linear(q_in, w[prefix + "query.weight"], w[prefix + "query.bias"]))
    k = split(F.linear(kv_in, w[prefix + "key.weight"], w[prefix + "key.bias"]))
    v = split(F.linear(kv_in, w[prefix + "value.weight"], w[prefix + "value.bias"]))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], -1)


def blip_vit(w, pixels, heads, patch):
    """BLIP vit.py's VisionTransformer.forward on the original keys: all tokens after the final norm."""
    p = "blip.visual_encoder."
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], w[n + ".weight"], w[n + ".bias"], 1e-6)  # noqa: E731
    x = F.conv2d(pixels, w[p + "patch_embed.proj.weight"], w[p + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w[p + "cls_token"].expand(len(x), -1, -1), x], dim=1) + w[p + "pos_embed"]
    for i in range(VIT["num_hidden_layers"]):
        b = f"{p}blocks.{i}."
        h = ln(x, b + "norm1")
        B, N, C = h.shape
        qkv = F.linear(h, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"]).reshape(
            B, N, 3, heads, C // heads
        )
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(B, N, C), w[b + "attn.proj.weight"], w[b + "attn.proj.bias"]
        )
        h = F.gelu(F.linear(ln(x, b + "norm2"), w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
    return ln(x, p + "norm")


def blip_text_cls(w, ids, mask, image_tokens):
    """med.py's BertModel in mode="multimodal" (bidirectional, cross-attention to every image token): [CLS]."""
    p = "blip.text_encoder."
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], w[n + ".weight"], w[n + ".bias"], 1e-12)  # noqa: E731
    dense = lambda x, n: F.linear(x, w[n + ".weight"], w[n + ".bias"])  # noqa: E731
    x = (
        w[p + "embeddings.word_embeddings.weight"][ids]
        + w[p + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = ln(x, p + "embeddings.LayerNorm")
    for i in range(TEXT_LAYERS):
        b = f"{p}encoder.layer.{i}."
        x = ln(
            x + dense(attend(x, x, w, b + "attention.self.", TEXT_HEADS, mask), b + "attention.output.dense"),
            b + "attention.output.LayerNorm",
        )
        cross = attend(x, image_tokens, w, b + "crossattention.self.", TEXT_HEADS)
        x = ln(x + dense(cross, b + "crossattention.output.dense"), b + "crossattention.output.LayerNorm")
        h = F.gelu(dense(x, b + "intermediate.dense"))
        x = ln(x + dense(h, b + "output.dense"), b + "output.LayerNorm")
    return x[:, 0]


def reference_scores(repo: Path, tokenizer_dir: Path, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """ImageReward.score: _transform(n_px) on the PIL image, BLIP, [CLS] -> MLP -> (r - mean) / std."""
    w = torch.load(repo / "ImageReward.pt", weights_only=True)
    size = VIT["image_size"]
    pixels = []
    for a in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        image = TF.center_crop(TF.resize(Image.fromarray(a), size, TF.InterpolationMode.BICUBIC), size)
        mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        pixels.append(TF.normalize(TF.to_tensor(image.convert("RGB")), mean, std))
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        feature = blip_text_cls(
            w, tokens["input_ids"], tokens["attention_mask"], blip_vit(w, torch.stack(pixels), 2, 8)
        )
        r = feature
        for i in (0, 2, 4, 6, 7):  # the MLP in eval mode: linear layers, dropouts are identities
            r = F.linear(r, w[f"mlp.layers.{i}.weight"], w[f"mlp.layers.{i}.bias"])
    return (r.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


# ----------------------------------------------------------------------------- tests


def build(repo: Path, tokenizer_dir: Path, **kwargs):
    return imagereward(local_path=str(repo), vision=VIT, tokenizer_local_path=str(tokenizer_dir), **kwargs)


def test_scores_equal_imagerewards_formula_on_the_same_tiny_weights(repo, tokenizer_dir):
    reward = build(repo, tokenizer_dir, batch_size=2)
    x = (torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    expected = reference_scores(repo, tokenizer_dir, x, PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.std() > 1e-3
    # the prompt matters (cross-attention runs both ways through the score)
    swapped = reward(x, PROMPTS[::-1])
    assert (swapped - scores).abs().max() > 1e-4


def test_resized_images_long_prompts_and_gradients(repo, tokenizer_dir):
    reward = build(repo, tokenizer_dir)
    smooth = F.interpolate(
        torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(2)), (64, 64), mode="bilinear"
    )
    smooth = (smooth * 255).round() / 255
    long = ["a cat " * 40]  # past 35 tokens: truncated as ImageReward does
    expected = reference_scores(repo, tokenizer_dir, smooth, long)
    torch.testing.assert_close(
        reward(smooth, long), expected, atol=0, rtol=0.01
    )  # torch vs PIL bicubic resize
    x = smooth.clone().requires_grad_(True)
    reward.scorer(x, long).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pins_and_mismatches_are_config_errors(repo, tokenizer_dir, tmp_path):
    digest = hashlib.sha256((repo / "ImageReward.pt").read_bytes()).hexdigest()
    assert build(repo, tokenizer_dir, checkpoint_sha256=digest).models["imagereward"].endswith(digest)
    with pytest.raises(ConfigError, match=r"reward\.sha256=0{64}"):
        build(repo, tokenizer_dir, checkpoint_sha256="0" * 64)
    with pytest.raises(ConfigError, match="does not fit"):
        imagereward(
            local_path=str(repo), vision=VIT | {"hidden_size": 64}, tokenizer_local_path=str(tokenizer_dir)
        )
    with pytest.raises(ConfigError, match="no ImageReward.pt in this folder"):
        build(tmp_path, tokenizer_dir)


def test_the_yaml_names_the_real_weights_and_builds_offline(repo, tokenizer_dir, monkeypatch):
    cfg = OmegaConf.load(configs.conf_dir() / "reward" / "imagereward.yaml")
    assert (cfg.model_id, cfg.checkpoint_file, cfg.med_config_file) == (
        "THUDM/ImageReward",
        "ImageReward.pt",
        "med_config.json",
    )
    assert (
        cfg.vision.hidden_size == 1024
        and cfg.vision.num_hidden_layers == 24
        and cfg.vision.layer_norm_eps == 1e-6
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"set reward\.local_path="):
        imagereward()
    assert (cfg.revision, cfg.checkpoint_sha256) == (  # pins quoted from the hub (see the YAML comments)
        "c63dec8373b5c3728b1d250865c402c9546be210",
        "d71dc8d4912bc633c06ab8ef1ef6a81e8199d4369f14b47b29baf1d19de561f6",
    )
    cfg.local_path, cfg.tokenizer_local_path, cfg.vision = str(repo), str(tokenizer_dir), VIT
    with pytest.raises(ConfigError, match=r"sha256=d71dc8d4"):  # the tiny file is not the real one
        build_reward(cfg, "cpu")
    cfg.checkpoint_sha256 = None
    assert build_reward(cfg, "cpu")(torch.rand(1, 3, 32, 32), ["a cat"]).shape == (1,)

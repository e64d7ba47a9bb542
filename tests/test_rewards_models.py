"""Model-based rewards on tiny models built from configs, saved in the hub layout and loaded back
through the same from_pretrained path a hub id takes: aesthetic (head fetched from a real local
HTTP server, sha256-pinned), CLIP score, PickScore, BERTScore recall and the weighted sum."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    DebertaConfig,
    DebertaModel,
)

from rlcm_exp import configs
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards import llava
from rlcm_exp.rewards.aesthetic import AestheticHead, aesthetic, fetch_head_weights
from rlcm_exp.rewards.base import build_reward, to_uint8
from rlcm_exp.rewards.bertscore import greedy_recall, load_bertscore
from rlcm_exp.rewards.clip import ClipImagePreprocess, clip_score, pickscore
from rlcm_exp.rewards.combine import weighted
from rlcm_exp.serving.server import compose_reward_config
from rlcm_exp.tokenizer import write_clip_tokenizer

CONF = configs.conf_dir() / "reward"
WORDS = ["a", "an", "the", "cat", "dog", "bird", "riding", "bike", "playing", "chess", "image", "contains"]
PROMPTS = ["a cat riding a bike", "a dog playing chess", "a bird"]
LAION_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def save_tiny_clip(folder: Path, seed: int, image_size: int = 32) -> Path:
    """A CLIPModel with ViT-L/14's 768-d projection (so the real head fits) but 32-d insides."""
    write_clip_tokenizer(folder, WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    text |= dict(num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id)
    text |= dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(image_size=image_size, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(folder)
    size = {"shortest_edge": image_size}
    image_processor = CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


@pytest.fixture(scope="module")
def head_file(tmp_path_factory) -> Path:
    """A random head saved the way LAION's file is: torch.save of a state dict with layers.* keys."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticHead(768).state_dict(), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def file_server(head_file):
    """A real HTTP server on 127.0.0.1 standing in for the public source of the head."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(head_file.parent))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def images(n: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- aesthetic


def test_head_has_laion_layer_sizes_and_key_names():
    head = AestheticHead(768)
    state = head.state_dict()
    assert list(state) == LAION_KEYS
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]  # 768-1024-128-64-16-1
    # no activations between the linear layers ("linearMSE"): in eval mode the head is affine
    head.eval()
    x, y, zero = torch.randn(2, 768), torch.randn(2, 768), torch.zeros(2, 768)
    with torch.no_grad():
        torch.testing.assert_close(head(x + y) - head(zero), (head(x) - head(zero)) + (head(y) - head(zero)))


def test_aesthetic_fetches_pinned_head_and_scores_normalised_embeddings(
    tiny_clip, head_file, file_server, tmp_path
):
    cache = tmp_path / "cache"
    url = f"{file_server}/{head_file.name}"
    reward = aesthetic(
        clip_local_path=str(tiny_clip),
        head_url=url,
        head_sha256=sha256(head_file),
        cache_dir=str(cache),
        batch_size=2,
    )
    x = images(3, size=32)  # the processor's size: no resize, so the manual path below matches closely
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert (cache / f"{sha256(head_file)}.pth").read_bytes() == head_file.read_bytes()

    # the same numbers by hand: CLIP image embedding, L2-normalised, into the LAION MLP
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip)(images=list(_to_pil(x)), return_tensors="pt")
    head = AestheticHead(768).eval()
    head.load_state_dict(torch.load(head_file, weights_only=True))
    with torch.no_grad():
        embedding = model.visual_projection(
            model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        )
        expected = head(F.normalize(embedding, dim=-1))
        unnormalised = head(embedding)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(embedding.norm(dim=-1), torch.ones(3), atol=0.1)
    assert (scores - unnormalised).abs().min() > 1e-3  # so the normalisation is really applied


def test_aesthetic_head_cache_serves_without_the_source(tiny_clip, head_file, file_server, tmp_path):
    url, digest = f"{file_server}/{head_file.name}", sha256(head_file)
    first = fetch_head_weights(url, digest, cache_dir=str(tmp_path))
    again = fetch_head_weights(
        "http://127.0.0.1:9/gone.pth", digest, cache_dir=str(tmp_path)
    )  # port 9: nothing
    assert first == again and sha256(again) == digest


def test_aesthetic_rejects_a_file_with_the_wrong_sha256(head_file, file_server, tmp_path):
    url = f"{file_server}/{head_file.name}"
    with pytest.raises(ConfigError, match=r"reward\.head_sha256=0{64}") as err:
        fetch_head_weights(url, "0" * 64, cache_dir=str(tmp_path))
    assert sha256(head_file) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-trusted left in the cache
    with pytest.raises(ConfigError, match="needs a pinned sha256"):
        fetch_head_weights(url, None, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="reward.head_local_path"):
        fetch_head_weights("http://127.0.0.1:9/gone.pth", "0" * 64, cache_dir=str(tmp_path))


def test_aesthetic_local_head_pth_or_safetensors_and_gradients(tiny_clip, head_file, tmp_path):
    pth = aesthetic(
        clip_local_path=str(tiny_clip), head_local_path=str(head_file), head_sha256=sha256(head_file)
    )
    safetensors = tmp_path / "head.safetensors"
    save_file(torch.load(head_file, weights_only=True), str(safetensors))
    st = aesthetic(clip_local_path=str(tiny_clip), head_local_path=str(safetensors), head_sha256=None)
    x = images(2)
    torch.testing.assert_close(pth(x, PROMPTS[:2]), st(x, PROMPTS[:2]))
    with pytest.raises(ConfigError, match="has sha256"):
        aesthetic(clip_local_path=str(tiny_clip), head_local_path=str(head_file), head_sha256="0" * 64)
    # the differentiable path: pixels -> resize/normalise (torch ops) -> CLIP -> head
    x = x.clone().requires_grad_(True)
    pth.scorer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_aesthetic_refuses_a_head_that_does_not_fit(tiny_clip, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ConfigError, match=r"layers\.0\.weight \(1024, 768\)"):
        aesthetic(clip_local_path=str(tiny_clip), head_local_path=str(bad), head_sha256=None)


def test_torch_preprocessing_matches_the_clip_processor(tiny_clip):
    processor = AutoImageProcessor.from_pretrained(tiny_clip)
    preprocess = ClipImagePreprocess(processor)
    for h, w in [(32, 32), (48, 40), (64, 96)]:
        # smooth images: resampling filters agree closely there (PIL/torchvision vs torch bicubic)
        x = F.interpolate(
            torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(h)), (h, w), mode="bilinear"
        )
        x = (x * 255).round() / 255
        expected = processor(images=list(_to_pil(x)), return_tensors="pt")["pixel_values"]
        got = preprocess(x)
        assert got.shape == expected.shape == (1, 3, 32, 32)
        torch.testing.assert_close(got, expected, atol=0.05 if (h, w) != (32, 32) else 1e-5, rtol=0)


def _to_pil(x: torch.Tensor):
    for img in (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        yield Image.fromarray(img)


def test_hub_ids_that_cannot_load_name_the_local_path_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"set reward\.local_path="):
        clip_score(model_id="openai/clip-vit-large-patch14")
    with pytest.raises(ConfigError, match=r"reward\.clip_local_path=/no/such: no such folder"):
        aesthetic(clip_local_path="/no/such", head_local_path=__file__, head_sha256=None)


# ----------------------------------------------------------------------------- CLIP score, PickScore


def test_clip_score_is_the_cosine_of_image_and_prompt_embeddings(tiny_clip):
    reward = clip_score(local_path=str(tiny_clip), batch_size=2)
    x = images(3, size=32)  # the processor's own size: no resize, so the manual path below is exact
    scores = reward(x, PROMPTS)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    inputs = processor(text=PROMPTS, images=list(_to_pil(x)), return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"]).pooler_output)
    torch.testing.assert_close(scores, F.cosine_similarity(img, txt), atol=1e-4, rtol=0)
    assert scores.abs().max() <= 1


def test_pickscore_uses_its_separate_processor_and_logit_scale(tiny_clip, tmp_path):
    model_only = tmp_path / "pickscore"
    CLIPModel.from_pretrained(tiny_clip).save_pretrained(
        model_only
    )  # PickScore's repo: weights, no processor
    with pytest.raises(ConfigError, match=r"reward\.processor_local_path"):
        pickscore(local_path=str(model_only), processor_id=None, processor_local_path="/no/such")
    reward = pickscore(local_path=str(model_only), processor_id=None, processor_local_path=str(tiny_clip))
    plain = clip_score(local_path=str(tiny_clip))
    x = images(3, size=32)
    scale = CLIPModel.from_pretrained(tiny_clip).logit_scale.exp().item()
    torch.testing.assert_close(reward(x, PROMPTS), plain(x, PROMPTS) * scale, atol=1e-3, rtol=1e-4)
    assert reward.models["processor"] == f"{tiny_clip} (local)"


# ----------------------------------------------------------------------------- BERTScore


def test_greedy_recall_by_hand():
    # reference tokens r1=(1,0), r2=(0,1); candidate tokens c1=(1,0), c2=(.6,.8), c3=pad
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    cand = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]])
    ref_mask, cand_mask = torch.tensor([[True, True]]), torch.tensor([[True, True, False]])
    # r1 best matches c1 (1.0), r2 best matches c2 (0.8; c3 would be 1.0 but is masked): (1 + .8) / 2
    torch.testing.assert_close(greedy_recall(ref, ref_mask, cand, cand_mask), torch.tensor([0.9]))
    empty = torch.zeros(1, 3, dtype=torch.bool)
    torch.testing.assert_close(greedy_recall(ref, ref_mask, cand, empty), torch.tensor([0.0]))


@pytest.fixture(scope="module")
def tiny_deberta(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("deberta")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(2)
    config = DebertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3
    )
    config.num_attention_heads, config.max_position_embeddings = 2, 64
    DebertaModel(config).save_pretrained(folder)
    return folder


def test_bertscore_recall_on_a_tiny_deberta(tiny_deberta):
    scorer, source = load_bertscore(local_path=str(tiny_deberta), num_layers=2, batch_size=2)
    assert source == f"{tiny_deberta} (local)"
    refs = ["the image contains a cat riding a bike", "the image contains a dog", "the image contains a bird"]
    cands = ["a cat riding a bike", "", "a bird the image contains"]
    recall = scorer.recall(cands, refs)
    assert recall.shape == (3,)
    assert recall[1] == 0  # an empty answer matches nothing
    assert 0 < recall[2] < 1  # contextual embeddings: the same words in another order are no exact match
    torch.testing.assert_close(scorer.recall(refs, refs), torch.ones(3))

    # by hand for the first pair: layer-2 states, specials dropped, greedy max, mean over the reference
    def states(text: str) -> torch.Tensor:
        enc = scorer.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(scorer.model(**enc, output_hidden_states=True).hidden_states[2][0], dim=-1)

    # reference words only ([CLS]/[SEP] dropped) against every candidate token, as bert_score does
    expected = (states(refs[0])[1:-1] @ states(cands[0]).T).max(dim=1).values.mean()
    torch.testing.assert_close(recall[0], expected)
    with pytest.raises(ConfigError, match=r"reward\.bertscore_num_layers=4: the model has 3 layers"):
        load_bertscore(local_path=str(tiny_deberta), num_layers=4)


# ----------------------------------------------------------------------------- weighted sum and configs


def test_weighted_sum_logs_each_component(tiny_clip):
    components = {
        "jpeg": OmegaConf.create({"_target_": "rlcm_exp.rewards.jpeg.jpeg_compressibility", "quality": 95}),
        "clip_score": OmegaConf.create(
            {"_target_": "rlcm_exp.rewards.clip.clip_score", "local_path": str(tiny_clip)}
        ),
        "const": lambda images, prompts: {
            "reward": torch.ones(len(images)),
            "bonus": torch.full((len(images),), 2.0),
        },
    }
    reward = weighted(components, {"jpeg": 0.5, "clip_score": 10.0, "const": -1.0}, device="cpu")
    x = images(3)
    out = reward(x, PROMPTS)
    assert set(out) == {"reward", "jpeg", "clip_score", "const", "const/bonus"}
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["reward"], 0.5 * out["jpeg"] + 10.0 * out["clip_score"] - 1.0)
    torch.testing.assert_close(out["clip_score"], clip_score(local_path=str(tiny_clip))(x, PROMPTS))
    with pytest.raises(ConfigError, match="one weight per component"):
        weighted(components, {"jpeg": 1.0})
    components["clip_score"].local_path = "/no/such"
    with pytest.raises(
        ConfigError, match=r"^reward\.components\.clip_score\.local_path=/no/such: no such folder"
    ):
        weighted(components, {"jpeg": 0.5, "clip_score": 10.0, "const": -1.0})


def test_reward_yamls_comment_every_field_and_instantiate(tiny_clip, head_file):
    for name in ["aesthetic", "clip_score", "pickscore", "llava_bertscore", "remote", "weighted"]:
        lines = (CONF / f"{name}.yaml").read_text().splitlines()
        fields = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "_target_"))]
        fields = [ln for ln in fields if not ln.rstrip().endswith(":")]  # a mapping's header line
        assert all("  # " in ln for ln in fields), [ln for ln in fields if "  # " not in ln]
    cfg = OmegaConf.load(CONF / "weighted.yaml")
    cfg.components.aesthetic.clip_local_path = str(tiny_clip)
    cfg.components.aesthetic.head_local_path = str(head_file)
    cfg.components.aesthetic.head_sha256 = None
    cfg.components.clip_score.local_path = str(tiny_clip)
    reward = instantiate(cfg, device="cpu")  # what the trainer does: device passed to the builder
    out = reward(images(2), PROMPTS[:2])
    torch.testing.assert_close(out["reward"], out["aesthetic"] + 10.0 * out["clip_score"])


# ----------------------------------------------------------------------------- the alignment request


class FakeVlm(torch.nn.Module):
    """Stands in for LLaVA: records what generate() is asked and answers two tokens per image."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def generate(self, **kwargs) -> torch.Tensor:
        self.calls.append(kwargs)
        ids = kwargs["input_ids"]
        return torch.cat([ids, torch.full((len(ids), 2), 9)], dim=1)


class FakeProcessor:
    """Stands in for the LLaVA processor: records the images and texts that reach the model."""

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(
            padding_side="right",
            pad_token_id=0,
            eos_token_id=1,
            batch_decode=lambda ids, skip_special_tokens: [" a cat "] * len(ids),
        )
        self.calls: list[tuple[list[Image.Image], list[str]]] = []

    def __call__(self, images, text, return_tensors, padding):
        self.calls.append((images, text))
        return {
            "input_ids": torch.zeros(len(images), 4, dtype=torch.long),
            "pixel_values": torch.zeros(len(images), 3, 8, 8),
        }


class FakeBertScore:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[str]]] = []

    def recall(self, candidates: list[str], references: list[str]) -> torch.Tensor:
        self.calls.append((candidates, references))
        return torch.full((len(candidates),), 0.5)


def alignment_request(monkeypatch, name: str, x: torch.Tensor):
    """Build reward=<name> from the shipped config with fake models; score x; return what reached them."""
    vlm, processor, bert = FakeVlm(), FakeProcessor(), FakeBertScore()
    monkeypatch.setattr(llava, "load_with_processor", lambda *a, **k: (vlm, processor, "fake"))
    monkeypatch.setattr(llava, "load_bertscore", lambda *a, **k: (bert, "fake"))
    # the memory check reads the hub models' config.json (tests/test_vlm_memory.py tests it): not here
    monkeypatch.setattr(llava, "check_fits", lambda *a, **k: None)
    reward = build_reward(compose_reward_config([f"+reward={name}"]), "cpu")
    assert reward(x, PROMPTS).tolist() == [0.5] * len(x)
    (pil, texts), (_, references) = processor.calls[0], bert.calls[0]
    return reward, vlm.calls[0], pil, texts, references


def _decoded_jpeg(array, quality: int):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_paper_preset_request_matches_the_reference_code(monkeypatch):
    x = images(3, size=32)
    reward, generate, pil, texts, references = alignment_request(monkeypatch, "llava_bertscore_paper", x)
    question = "Answer concisely: what is going on in this image?"
    assert texts == [f"USER: <image>\n{question} ASSISTANT:"] * 3
    assert references == [f"The image contains {p}" for p in PROMPTS]
    assert generate["max_new_tokens"] == 64 and generate["do_sample"] is False and generate["num_beams"] == 1
    assert reward.answerer.query.image_transport == "jpeg" and reward.answerer.query.jpeg_quality == 80
    # the pixels that reach the VLM went through a JPEG of quality 80 (not the raw ones, not another quality)
    raw = to_uint8(x)
    for got, original in zip(pil, raw, strict=True):
        got = np.asarray(got)
        np.testing.assert_array_equal(got, _decoded_jpeg(original, 80))
        assert not np.array_equal(got, original) and not np.array_equal(got, _decoded_jpeg(original, 95))


def test_default_alignment_request_is_unchanged(monkeypatch):
    x = images(3, size=32)
    _, generate, pil, texts, references = alignment_request(monkeypatch, "llava_bertscore", x)
    assert texts == ["USER: <image>\nAnswer concisely: what is going on in this image? ASSISTANT:"] * 3
    assert references == [f"The image contains {p}" for p in PROMPTS]
    assert generate["max_new_tokens"] == 32
    for got, original in zip(pil, to_uint8(x), strict=True):  # the sampled pixels, 8-bit, untouched
        np.testing.assert_array_equal(np.asarray(got), original)
    with pytest.raises(ConfigError, match=r"reward\.image_transport=webp"):
        llava.VlmQuery(image_transport="webp")


def test_paper_preset_yaml_comments_every_field():
    lines = (CONF / "llava_bertscore_paper.yaml").read_text().splitlines()
    fields = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "-", "defaults:"))]
    assert fields and all("  # " in ln for ln in fields), [ln for ln in fields if "  # " not in ln]

"""The VLM reward's memory (issue 29 finding 15): LLaVA-1.5-13B's estimate, hand-worked from its
config (weights + KV cache + BERTScore), the knob it names on the paper's 48 GB and on an 80 GB GPU,
and a reward refused from its configs alone, before any weight loads. Estimates: no GPU measured them."""

from __future__ import annotations

import pytest
from transformers import DebertaConfig, LlavaConfig

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.memory import GIB, transformer_params, vlm_refusal
from rlcm_exp.rewards.llava import VlmQuery, llava_bertscore, vlm_call

TEXT_13B = dict(
    model_type="llama", hidden_size=5120, num_hidden_layers=40, intermediate_size=13824, vocab_size=32064
)
VISION_L336 = dict(
    model_type="clip_vision_model", hidden_size=1024, num_hidden_layers=24, intermediate_size=4096,
    num_attention_heads=16, image_size=336, patch_size=14,
)  # fmt: skip
LLAVA_13B = LlavaConfig(text_config=TEXT_13B | {"num_attention_heads": 40}, vision_config=VISION_L336)
DEBERTA_XL = DebertaConfig(
    hidden_size=1024, num_hidden_layers=48, intermediate_size=4096, vocab_size=50265, num_attention_heads=16
)


def test_transformer_parameters_hand_worked() -> None:
    # 2 layers x (4 x 8^2 + 3 x 8 x 16) + 10 x 8 x 2 = 2 x 640 + 160
    assert transformer_params(8, 2, 16, 10, gated=True, head=True) == 1440
    assert transformer_params(8, 2, 16, 10, gated=False, head=False) == 2 * (256 + 256) + 80


def test_llava_13b_estimate_hand_worked() -> None:
    call = vlm_call(LLAVA_13B, VlmQuery(), 16, "float32", DEBERTA_XL)
    # text: 40 x (4 x 5120^2 + 3 x 5120 x 13824) + 2 x 32064 x 5120 = 13,016,104,960; vision: 24 x
    # (4 x 1024^2 + 2 x 1024 x 4096) = 301,989,888; projector 1024 x 5120 + 5120^2 = 31,457,280
    assert call.params_b * 1e9 == pytest.approx(13_349_552_128)
    assert call.other_b * 1e9 == pytest.approx(48 * 12_582_912 + 50265 * 1024)  # 655,451,136
    # 576 image tokens + 74 characters of question / 3 + 1 = 601; + 32 new tokens = 633
    assert (call.layers, call.kv_width, call.prompt_tokens, call.new_tokens) == (40, 5120, 601, 32)
    e = call.estimate()
    assert e.weights == pytest.approx(13_349_552_128 * 4 + 655_451_136 * 4)  # 52.2 GiB
    assert e.activations == 2 * 40 * 5120 * 633 * 16 * 4  # 16,593,715,200 B = 15.5 GiB of KV cache
    assert e.total == pytest.approx(72.61e9, rel=1e-4)  # the finding's ~75 GB in fp32
    half = vlm_call(LLAVA_13B, VlmQuery(), 16, "float16", DEBERTA_XL).estimate()
    assert half.total == pytest.approx(29_320_908_800 + 8_296_857_600)  # 35.0 GiB: BERTScore stays fp32


def test_the_refusal_names_the_knob() -> None:
    fp32 = vlm_call(LLAVA_13B, VlmQuery(), 16, "float32", DEBERTA_XL)
    # the paper's 48 GB GPU (48 GiB free, budget 43.2 GiB): fp32 weights alone (52.2 GiB) do not fit
    why = vlm_refusal(fp32, 48 * GIB)
    assert why is not None and "\n" not in why and why.endswith("set reward.dtype=float16")
    assert vlm_refusal(vlm_call(LLAVA_13B, VlmQuery(), 16, "float16", DEBERTA_XL), 48 * GIB) is None
    # 80 GB free (budget 72e9 B): batch 16 needs 72.61e9; batch 15: 56.02e9 + 15 x 1.037e9 = 71.58e9
    assert vlm_refusal(fp32, 80e9).endswith("set reward.batch_size=15")  # type: ignore[union-attr]
    assert "larger GPU" in vlm_refusal(fp32, 10 * GIB)  # type: ignore[operator]


def test_a_reward_that_cannot_fit_is_refused_from_its_configs_alone(tmp_path) -> None:
    vlm, bert = tmp_path / "llava", tmp_path / "deberta"  # configs only: no weights to load
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=40)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    vision |= dict(num_attention_heads=2)
    LlavaConfig(text_config=text | {"num_attention_heads": 2}, vision_config=vision).save_pretrained(vlm)
    DebertaConfig(
        hidden_size=32, num_hidden_layers=1, intermediate_size=64, vocab_size=40, num_attention_heads=2
    ).save_pretrained(bert)
    # 2 x 1 layer x 32 x 633 tokens x 4 B = 162 kB of cache per image: 10^9 images fit no host
    with pytest.raises(
        ConfigError, match=r"^reward=llava_bertscore on cpu: the VLM reward needs .*reward\.batch_size=\d+$"
    ):
        llava_bertscore(
            vlm_local_path=str(vlm), bertscore_local_path=str(bert), batch_size=10**9, device="cpu"
        )

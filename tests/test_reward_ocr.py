"""The OCR reward: Flow-GRPO's text score by hand, then the real PP-OCRv4 ONNX models (shipped in the
rapidocr-onnxruntime wheel, nothing downloaded) reading words rendered with PIL, built from
conf/reward/ocr.yaml the way the trainer builds it."""

from __future__ import annotations

import math

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import build_reward
from rlcm_exp.rewards.ocr import OcrReward, levenshtein, normalise, ocr_score, quoted_text

from .helpers import WORDS, render

pytest.importorskip("rapidocr_onnxruntime")


@pytest.fixture(scope="module")
def reward() -> OcrReward:
    cfg = compose("config", ["reward=ocr", "reward.num_threads=1"])
    built = build_reward(cfg.reward, "cpu")
    assert isinstance(built, OcrReward)
    return built


# ----------------------------------------------------------------------------- the score by hand


def test_the_target_is_the_first_quoted_text_and_a_prompt_without_one_is_handled_by_the_policy():
    assert quoted_text('a sign that says "Hello World" and "bye"') == "Hello World"
    assert quoted_text("a neon sign reading \u201copen late\u201d") == "open late"
    assert quoted_text('an empty banner ""') == ""
    with pytest.raises(ValueError, match=r"ocr reward .*'a cat on a mat' has none"):
        quoted_text("a cat on a mat")
    assert quoted_text("a cat on a mat", "whole_prompt") == "a cat on a mat"
    assert quoted_text("a cat on a mat", "nan") is None


def test_levenshtein_and_the_normalised_score_by_hand():
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    assert normalise("Hello World") == "helloworld"
    assert ocr_score("HELLO world", "hello World") == 1.0  # case and spaces do not count
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)  # one deletion in five characters
    assert ocr_score("open late tonight", "late") == 1.0  # the target inside the read text: distance 0
    assert ocr_score("open late tonight", "late", substring_match=False) == 0.0  # 13 edits, clipped to 4
    assert ocr_score("", "abc") == 0.0  # nothing read: the full length, the lowest score
    assert ocr_score("xyz", "") == 1.0  # an empty target divides by max(0, 1) and always matches


# ----------------------------------------------------------------------------- the real model


def test_rendered_words_score_high_against_their_own_text_and_low_against_another(reward):
    images = render([*WORDS, "Stop sign"])
    assert images.shape == (4, 3, 96, 256) and images.dtype == torch.float32
    own = reward(images, [f'a sign that says "{w}"' for w in [*WORDS, "stop sign"]])
    assert own.shape == (4,) and own.dtype == torch.float32
    assert (own > 0.8).all(), own
    for shift in (1, 2):  # every word's image against each of the other two words
        other = [WORDS[(i + shift) % len(WORDS)] for i in range(len(WORDS))]
        scores = reward(images[:3], [f'the word "{w}"' for w in other])
        assert (scores < 0.3).all(), (other, scores)


def test_a_blank_image_scores_zero_and_a_prompt_without_quotes_follows_the_policy(reward):
    assert reward(render([None]), ['a sign that says "hello"']).tolist() == [0.0]
    with pytest.raises(ValueError, match=r"ocr reward .*'a plain sign' has none"):
        reward(render(["hello", "hello"]), ['a sign "hello"', "a plain sign"])
    lenient = OcrReward(reward.engine, "nan", True, reward.models)
    scores = lenient(render(["hello", "hello"]), ['a sign "hello"', "a plain sign"])
    assert scores[0] > 0.8 and math.isnan(scores[1])
    with pytest.raises(ConfigError, match="reward.missing_quotes=skip"):
        OcrReward(reward.engine, "skip", True, reward.models)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(render(["hello"])[:, :1], ['"hello"'])

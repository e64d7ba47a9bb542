"""The toy world's data and detector: held-out split, renderer, hand-checked scores, accuracy."""

from __future__ import annotations

import numpy as np
import torch

from rlcm_exp.toy import data
from rlcm_exp.toy.detector import classify, detector_parts, detector_score
from rlcm_exp.toy.reward import toy_detector


def test_prompt_lists_are_disjoint_and_cover_every_composition() -> None:
    train, held = data.train_prompts(), data.heldout_prompts()
    assert len(train) == 81 and len(held) == 9
    assert not set(train) & set(held)
    assert len(set(train) | set(held)) == 90
    # Every word pair of a held-out composition is still seen in training.
    seen = [data.parse_caption(p) for p in train]
    for colour, shape, background in data.HELDOUT:
        assert any(c == colour and b == background for c, _, b in seen)
        assert any(c == colour and s == shape for c, s, _ in seen)
        assert any(s == shape and b == background for _, s, b in seen)


def test_render_is_deterministic_and_draws_training_prompts() -> None:
    a, caps_a = data.render(16, np.random.default_rng(3))
    b, caps_b = data.render(16, np.random.default_rng(3))
    assert a.shape == (16, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caps_a == caps_b
    assert set(caps_a) <= set(data.train_prompts())


def _flat(colour: str, n: int = 1) -> np.ndarray:
    return np.broadcast_to(np.array(data.PALETTE[colour], np.uint8), (n, 32, 32, 3)).copy()


def test_score_thirds_by_hand() -> None:
    images, _ = data.render(["a red square on a blue background"], np.random.default_rng(0))
    assert classify(images) == [("red", "square", "blue")]
    cases = {
        "a red square on a blue background": 1.0,
        "a red circle on a blue background": 2 / 3,  # wrong shape
        "a green square on a blue background": 2 / 3,  # wrong shape colour
        "a red square on a yellow background": 2 / 3,  # wrong background
        "a green triangle on a blue background": 1 / 3,  # only the background right
        "a green triangle on a yellow background": 0.0,
        "a photo of a cat": 0.0,  # not a toy caption
    }
    for caption, want in cases.items():
        assert np.isclose(detector_score(images, [caption])[0], want), caption
    # The thirds, one attribute each: the wrong word is the part that scores 0.
    parts = detector_parts(
        np.repeat(images, 2, axis=0),
        ["a red circle on a blue background", "a green square on a yellow background"],
    )
    assert {k: v.tolist() for k, v in parts.items()} == {
        "colour": [1.0, 0.0],
        "shape": [0.0, 1.0],
        "background": [1.0, 0.0],
    }
    # A flat image earns only the background third.
    assert np.isclose(detector_score(_flat("blue"), ["a red square on a blue background"])[0], 1 / 3)


def test_detector_is_correct_on_fresh_images_also_with_noise() -> None:
    rng = np.random.default_rng(123)
    prompts = data.train_prompts() + data.heldout_prompts()
    images, captions = data.render([prompts[i % len(prompts)] for i in range(1500)], rng)
    assert (detector_score(images, captions) == 1.0).mean() >= 0.99
    noisy = np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8)
    assert (detector_score(noisy, captions) == 1.0).mean() >= 0.99
    # Chance level: shuffled captions score far lower.
    shuffled = [captions[i] for i in rng.permutation(len(captions))]
    assert detector_score(images, shuffled).mean() < 0.4


def test_reward_takes_float_nchw_and_matches_numpy() -> None:
    images, captions = data.render(8, np.random.default_rng(5))
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    out = toy_detector()(as_float, captions)
    assert set(out) == {"reward", "colour", "shape", "background"}
    reward = out["reward"]
    assert reward.dtype == torch.float32 and reward.shape == (8,) and reward.device.type == "cpu"
    assert torch.allclose(reward, torch.from_numpy(detector_score(images, captions)))
    assert torch.all(reward == 1.0)

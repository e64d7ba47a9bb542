"""The VLM judge against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/openai_server.py,
deterministic answers), through the official openai client, built from conf/reward/vlm_judge.yaml
as the trainer builds it: both modes, then a stopped server, a slow one, a rubric answer that is not
a number, missing logprobs, a wrong API key; the scoring rules by hand."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import build_reward, to_uint8
from rlcm_exp.rewards.vlm_judge import (
    VlmJudge,
    VlmJudgeError,
    answer_text_score,
    rubric_score,
    yes_probability,
)

from . import openai_server
from .openai_server import Behaviour

pytest.importorskip("openai")

KEY_ENV = "RLCM_TEST_VLM_KEY"
PROMPTS = ["a red square", "a blue square", "a red circle"]
FAST = ["reward.timeout_s=0.3", "reward.max_retries=2", "reward.backoff_s=0.01", "reward.max_concurrency=2"]


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def url(behaviour: Behaviour) -> Iterator[str]:
    server, base_url = openai_server.start(behaviour)
    try:
        yield base_url
    finally:
        openai_server.stop(server)


def judge(base_url: str, *overrides: str) -> VlmJudge:
    cfg = compose(
        "config",
        ["reward=vlm_judge", f"reward.base_url={base_url}", "reward.model=tiny-judge", *FAST, *overrides],
    )
    assert not any(k in cfg.reward for k in ("api_key", "token"))  # a key never sits in a config
    built = build_reward(cfg.reward, "cpu")
    assert isinstance(built, VlmJudge)
    return built


def images() -> torch.Tensor:
    """Three flat images whose red channel is 51/255, 128/255 and 204/255 (exact in 8 bits)."""
    red = torch.tensor([51, 128, 204]) / 255
    x = torch.full((3, 3, 8, 8), 0.5)
    x[:, 0] = red.view(3, 1, 1)
    return x


def expected_p(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    red = torch.from_numpy(to_uint8(x)[..., 0]).double().mean(dim=(1, 2)) / 255
    values = [r if "red" in p else 1 - r for r, p in zip(red.tolist(), prompts, strict=True)]
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- the rules by hand


def test_yes_probability_and_rubric_score_by_hand():
    alts = [("Yes", math.log(0.6)), (" yes", math.log(0.1)), ("NO ", math.log(0.2)), ("maybe", math.log(0.1))]
    assert yes_probability(alts) == pytest.approx(0.7 / 0.9)  # "Yes" and " yes" add up; "maybe" is left out
    assert yes_probability([("maybe", 0.0), ("Perhaps", -1.0)]) is None
    assert rubric_score("Score: 7/10", 1, 10) == pytest.approx(6 / 9)  # the first number counts
    assert rubric_score("7.5", 1, 10) == pytest.approx(6.5 / 9)
    assert rubric_score("1", 1, 10) == 0.0 and rubric_score("10", 1, 10) == 1.0
    assert rubric_score("excellent", 1, 10) is None and rubric_score("11", 1, 10) is None
    assert answer_text_score(" Yes.") == 1.0 and answer_text_score("no, it does not") == 0.0
    assert answer_text_score("YES") == 1.0 and answer_text_score('"No"') == 0.0
    assert answer_text_score("maybe yes") is None and answer_text_score("7 yes") is None
    assert answer_text_score("") is None and answer_text_score("Yesterday") is None


# ----------------------------------------------------------------------------- both modes


def test_yes_no_is_p_yes_from_the_top_logprobs_with_the_key_from_the_environment(url, behaviour, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    behaviour.api_key = "sk-test-123"
    reward = judge(url, f"reward.api_key_env={KEY_ENV}")
    assert "sk-test" not in repr(reward)
    x = images()
    scores = reward(x, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected_p(x, PROMPTS), atol=1e-6, rtol=0)
    assert len(behaviour.requests) == 3
    assert sorted(r["question"] for r in behaviour.requests) == sorted(
        f"Does this image show {p}? Answer yes or no." for p in PROMPTS
    )
    for request in behaviour.requests:
        body = request["body"]
        assert request["authorization"] == "Bearer sk-test-123"
        assert body["model"] == "tiny-judge" and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["max_tokens"] == 1 and body["temperature"] == 0.0


def test_rubric_reads_the_number_and_maps_it_to_0_1_with_the_key_from_a_file(url, behaviour, tmp_path):
    key_file = Path(tmp_path / "key")
    key_file.write_text("sk-file-456\n")
    behaviour.api_key = "sk-file-456"
    reward = judge(url, "reward.mode=rubric", f"reward.api_key_file={key_file}")
    x = images()
    scores = reward(x, PROMPTS)
    n = torch.round(1 + 9 * expected_p(x, PROMPTS))  # the server answers "Score: N"
    torch.testing.assert_close(scores.double(), (n - 1) / 9, atol=1e-6, rtol=0)
    body = behaviour.requests[0]["body"]
    assert "logprobs" not in body and body["max_tokens"] == 16
    assert all(r["question"].startswith("On a scale from 1 to 10, how well") for r in behaviour.requests)


def test_at_most_max_concurrency_requests_are_in_flight_and_scores_keep_their_order(url, behaviour):
    behaviour.delay_s = 0.1
    x = images().repeat(2, 1, 1, 1)
    prompts = PROMPTS + ["a blue circle", "a red star", "a blue star"]
    scores = judge(url, "reward.max_concurrency=2", "reward.timeout_s=5")(x, prompts)
    torch.testing.assert_close(scores.double(), expected_p(x, prompts), atol=1e-6, rtol=0)
    assert len(behaviour.requests) == 6 and behaviour.max_in_flight == 2


# ----------------------------------------------------------------------------- failures


def test_a_stopped_server_is_retried_then_one_line_error(behaviour, caplog):
    server, base_url = openai_server.start(behaviour)
    openai_server.stop(server)  # the port is closed: connection refused
    reward = judge(base_url)
    with caplog.at_level(logging.WARNING), pytest.raises(VlmJudgeError) as info:
        reward(images()[:1], PROMPTS[:1])
    message = str(info.value)
    assert "\n" not in message and base_url in message and "did not answer after 3 attempt(s)" in message
    assert "APIConnectionError" in message and "Connection refused" in message
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


def test_a_server_slower_than_the_timeout_is_retried_then_one_line_error(url, behaviour):
    behaviour.delay_s = 1.0
    reward = judge(url)
    start = time.monotonic()
    with pytest.raises(VlmJudgeError, match=r"did not answer after 3 attempt\(s\).*APITimeoutError") as info:
        reward(images()[:1], PROMPTS[:1])
    assert time.monotonic() - start < 3.0 and "\n" not in str(info.value)
    assert len(behaviour.requests) == 3  # each attempt reached the server and timed out


def test_a_rubric_answer_without_a_number_is_an_error_naming_it_and_not_retried(url, behaviour):
    behaviour.text = "excellent work"
    with pytest.raises(
        VlmJudgeError, match=r"answered 'excellent work' for prompt 'a red square': no number"
    ):
        judge(url, "reward.mode=rubric")(images()[:1], PROMPTS[:1])
    assert len(behaviour.requests) == 1
    behaviour.text = "42"
    with pytest.raises(VlmJudgeError, match=r"answered '42'.*from 1 to 10"):
        judge(url, "reward.mode=rubric")(images()[:1], PROMPTS[:1])


def test_without_logprobs_answer_text_scores_yes_1_and_no_0_and_says_so(url, behaviour, caplog):
    """missing_logprobs=answer_text: the server sends no logprobs, the first word of its answer is the
    score; the component yes_no_from_text marks every image so scored, and one warning says it."""
    behaviour.logprobs = False
    reward = judge(url, "reward.missing_logprobs=answer_text")
    for text, expected in (("Yes.", 1.0), (" no, it is blue", 0.0)):
        behaviour.text = text
        with caplog.at_level(logging.WARNING):
            out = reward(images(), PROMPTS)
        assert set(out) == {"reward", "yes_no_from_text"}
        torch.testing.assert_close(out["reward"], torch.full((3,), expected))
        torch.testing.assert_close(out["yes_no_from_text"], torch.ones(3))
    assert sum("yes_no scores are read from the answers' text" in r.getMessage() for r in caplog.records) == 1
    behaviour.text = "Perhaps"
    with pytest.raises(
        VlmJudgeError, match=r"sent no logprobs and answered 'Perhaps' for prompt .*neither yes nor no"
    ):
        reward(images()[:1], PROMPTS[:1])
    behaviour.logprobs = True  # a server with logprobs: P(yes) as without the option, flagged 0
    out = reward(images(), PROMPTS)
    torch.testing.assert_close(out["reward"].double(), expected_p(images(), PROMPTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["yes_no_from_text"], torch.zeros(3))


def test_an_answer_with_a_wrong_number_of_choices_is_an_error_at_once(url, behaviour):
    """One question, one choice: a server answering with none or several (a wrong `n`, a broken
    proxy) gets a one-line error naming the count, without retries; the same in rubric mode."""
    judges = [judge(url, f"reward.mode={mode}") for mode in ("yes_no", "rubric")]
    for count in (0, 2):
        behaviour.choices = count
        for reward in judges:
            with pytest.raises(
                VlmJudgeError, match=rf"sent {count} choices for one question, expected 1"
            ) as info:
                reward(images()[:1], PROMPTS[:1])
            assert "\n" not in str(info.value) and url in str(info.value)
    assert len(behaviour.requests) == 4  # none retried


def test_missing_logprobs_and_a_wrong_key_are_errors_at_once(url, behaviour):
    behaviour.logprobs = False
    with pytest.raises(
        VlmJudgeError,
        match="sent no top logprobs .*reward.mode=rubric, or reward.missing_logprobs=answer_text",
    ):
        judge(url)(images()[:1], PROMPTS[:1])
    behaviour.api_key = "the-right-key"
    with pytest.raises(VlmJudgeError, match=r"refused the request: HTTP 401"):
        judge(url)(images()[:1], PROMPTS[:1])
    assert len(behaviour.requests) == 1  # the refused request was not retried


def test_config_mistakes_are_config_errors(url):
    with pytest.raises(ConfigError, match="reward.mode=score must be one of yes_no, rubric"):
        judge(url, "reward.mode=score")
    with pytest.raises(ConfigError, match="reward.missing_logprobs=zero must be one of error, answer_text"):
        judge(url, "reward.missing_logprobs=zero")
    with pytest.raises(ConfigError, match=r"reward.question_template=.* must contain \{prompt\}"):
        judge(url, "reward.question_template='Is this good?'")
    with pytest.raises(ConfigError, match=r"reward.rubric_template=.*only the fields"):
        judge(url, "reward.mode=rubric", "reward.rubric_template='Rate {prompt} {stars}'")
    with pytest.raises(ConfigError, match="reward.model is not set"):
        build_reward(compose("config", ["reward=vlm_judge"]).reward, "cpu")

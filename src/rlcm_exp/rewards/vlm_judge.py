"""A vision-language model as judge, asked through any OpenAI-compatible chat-completions server
(vLLM, SGLang, `transformers serve`, llama.cpp's server, a hosted API) with the official `openai` client.

One request per image: a user message holding the image (a PNG data URL of the 8-bit pixels,
`to_uint8`) and a question built from the image's prompt. Two modes:

- `yes_no`: question_template (default 'Does this image show {prompt}? Answer yes or no.'), one
  answer token with its top `top_logprobs` alternatives; over the alternatives of that first
  token, compared case-insensitively with surrounding spaces stripped,
      reward = P(yes) / (P(yes) + P(no)),   P(x) = sum of exp(logprob) of the alternatives reading x
  in [0, 1]. Neither yes nor no among the alternatives is an error. vLLM, SGLang, llama.cpp's server and
  OpenAI's API send logprobs; `transformers serve` (5.x) ignores `logprobs`/`top_logprobs` and answers
  `"logprobs": null`. What a server without logprobs gets is `missing_logprobs`:
  - `error` (default): a one-line VlmJudgeError naming the two ways out (rubric, or answer_text);
  - `answer_text`: the answer's first word read as the score, 1 for yes and 0 for no (case and
    punctuation ignored; any other first word is an error naming the answer). A binary score, as
    GenEval's pass/fail, coarser than P(yes): never silent, the reward returns the component
    `yes_no_from_text` (1 for each image so scored, else 0; the trainer logs its mean as
    reward/yes_no_from_text) and the first such answer is logged as a warning.
- `rubric`: rubric_template asks for a number from rubric_min to rubric_max; the first number in
  the answer is read and mapped linearly to [0, 1]. An answer with no number, or one outside the
  range, is an error naming the answer.

Failure policy (a run never trains on made-up rewards, never hangs on a dead server): connection
errors, timeouts (`timeout_s` per request), HTTP 408/409/429 and 5xx are retried at most
`max_retries` times with exponential backoff (each retry logged), then a one-line VlmJudgeError
naming the server and the last failure; any other HTTP error and every malformed answer raise at once.
At most `max_concurrency` requests are in flight (a thread pool); the first failure cancels the rest.

The API key is read from the environment variable `api_key_env` or the file `api_key_file` (first
line), never from the config, so no run dir holds it; without one, the placeholder "EMPTY" is sent
(local servers ignore it).
"""

from __future__ import annotations

import base64
import logging
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Unpack

import numpy as np
import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_images, check_prompts, encode_image, to_uint8
from rlcm_exp.rewards.retry import RetryPolicy, backoff_delay, retry_settings
from rlcm_exp.secrets import read_token

log = logging.getLogger(__name__)

MODES = ("yes_no", "rubric")
MISSING_LOGPROBS = ("error", "answer_text")
QUESTION_TEMPLATE = "Does this image show {prompt}? Answer yes or no."
RUBRIC_TEMPLATE = (
    "On a scale from {low} to {high}, how well does this image show {prompt}? Consider both how "
    "faithfully it follows the description and its visual quality. Answer with the number only."
)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FIRST_WORD = re.compile(r"\W*([^\W\d_]+)")
_RETRY_STATUS = {408, 409, 429}


class VlmJudgeError(RuntimeError):
    """The judge could not score a batch; the one-line message names the server and what failed."""


def image_data_url(image: np.ndarray) -> str:
    """One (H, W, 3) uint8 image -> a `data:image/png;base64,...` URL (lossless)."""
    return "data:image/png;base64," + base64.b64encode(encode_image(image, "png")).decode("ascii")


def yes_probability(alternatives: list[tuple[str, float]]) -> float | None:
    """P(yes) / (P(yes) + P(no)) over (token, logprob) alternatives of one answer token; tokens are
    compared lower-cased with spaces stripped. None when neither yes nor no is among them."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in alternatives:
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


def rubric_score(answer: str, low: float, high: float) -> float | None:
    """The first number in `answer`, mapped from [low, high] to [0, 1]; None when there is no number
    in range."""
    match = _NUMBER.search(answer)
    if match is None:
        return None
    value = float(match.group())
    if not low <= value <= high:
        return None
    return (value - low) / (high - low)


def answer_text_score(answer: str) -> float | None:
    """yes_no without logprobs: 1.0 when the answer's first word is yes, 0.0 when it is no (case and
    leading punctuation ignored: " Yes." is yes); None for any other first word, or none."""
    match = _FIRST_WORD.match(answer)
    return {"yes": 1.0, "no": 0.0}.get(match.group(1).lower()) if match else None


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:300]


def _describe(err: BaseException) -> str:
    """`APIConnectionError: Connection error. (ConnectError: [Errno 111] Connection refused)`: the
    client's error and, when it wraps one, the transport's."""
    cause = err.__cause__ or err.__context__
    text = f"{type(err).__name__}: {err}"
    return f"{text} ({type(cause).__name__}: {cause})" if cause is not None and str(cause) else text


class VlmJudge:
    """reward(images, prompts) -> (B,) judge scores in [0, 1]. Thread-safe (the openai client is)."""

    def __init__(
        self,
        client: Any,
        base_url: str,
        model: str,
        mode: str,
        template: str,
        rubric_range: tuple[float, float],
        top_logprobs: int,
        max_tokens: int,
        retry: tuple[int, float, float],
        max_concurrency: int,
        missing_logprobs: str = "error",
    ) -> None:
        self.client = client
        self.base_url = base_url
        self.model = model
        self.mode = mode
        self.template = template
        self.low, self.high = rubric_range
        self.top_logprobs = top_logprobs
        self.max_tokens = max_tokens
        self.max_retries, self.backoff_s, self.max_backoff_s = retry
        self.max_concurrency = max_concurrency
        self.missing_logprobs = missing_logprobs
        self._warned_text = False  # the first answer scored from its text is logged as a warning
        self.models = {"vlm_judge": f"{model} at {base_url}"}
        self._where = f"vlm_judge: server {base_url} (model {model})"

    def __repr__(self) -> str:  # the client holds the API key: never show it
        return f"VlmJudge(base_url={self.base_url!r}, model={self.model!r}, mode={self.mode!r})"

    def question(self, prompt: str) -> str:
        return self.template.format(prompt=prompt, low=_fmt(self.low), high=_fmt(self.high))

    # ------------------------------------------------------------------ one request, with retries

    def _request(self, image_url: str, question: str) -> Any:
        content = [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": question},
        ]
        options: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0.0}
        if self.mode == "yes_no":
            options |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": content}], **options
        )

    def _ask(self, image_url: str, question: str) -> Any:
        """One chat completion; retryable failures are retried with backoff, then VlmJudgeError."""
        import openai

        attempts, start = self.max_retries + 1, time.monotonic()
        for attempt in range(1, attempts + 1):
            try:
                return self._request(image_url, question)
            except (
                openai.APIConnectionError,
                openai.APIStatusError,
            ) as err:  # timeouts are connection errors
                status = getattr(err, "status_code", None)
                last = f"HTTP {status}: {_one_line(err.message)}" if status else _describe(err)
                if status is not None and status not in _RETRY_STATUS and status < 500:
                    raise VlmJudgeError(f"{self._where} refused the request: {last}") from err
                if attempt == attempts:
                    raise VlmJudgeError(
                        f"{self._where} did not answer after {attempts} attempt(s) over "
                        f"{time.monotonic() - start:.1f}s (last error: {_one_line(last)}); is it running at "
                        "reward.base_url and serving reward.model? A slow server needs a larger reward.timeout_s."
                    ) from err
                delay = backoff_delay(attempt, self.backoff_s, self.max_backoff_s)
                log.warning(
                    "%s: %s; retry %d/%d in %.2fs", self._where, last, attempt, self.max_retries, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ reading an answer

    def _score(self, answer: Any, prompt: str) -> tuple[float, bool]:
        """The score of one chat completion, and whether it was read from the answer's text (yes_no
        without logprobs, missing_logprobs=answer_text); a malformed answer is a VlmJudgeError naming it."""
        choices = getattr(answer, "choices", None) or []
        if len(choices) != 1:
            raise VlmJudgeError(f"{self._where} sent {len(choices)} choices for one question, expected 1")
        choice = choices[0]
        if self.mode == "rubric":
            text = choice.message.content if choice.message is not None else None
            score = rubric_score(text or "", self.low, self.high)
            if score is None:
                raise VlmJudgeError(
                    f"{self._where} answered {_one_line(text)!r} for prompt {prompt!r}: no number from "
                    f"{_fmt(self.low)} to {_fmt(self.high)} in it"
                )
            return score, False
        tokens = choice.logprobs.content if choice.logprobs is not None else None
        if not tokens or not tokens[0].top_logprobs:
            return self._score_text(choice, prompt), True
        alternatives = [(t.token, t.logprob) for t in tokens[0].top_logprobs]
        p_yes = yes_probability(alternatives)
        if p_yes is None:
            seen = ", ".join(repr(t) for t, _ in alternatives[:8])
            raise VlmJudgeError(
                f"{self._where}: neither yes nor no among the top {len(alternatives)} first tokens ({seen}) "
                f"for prompt {prompt!r}; adjust reward.question_template or raise reward.top_logprobs"
            )
        return p_yes, False

    def _score_text(self, choice: Any, prompt: str) -> float:
        """yes_no from a server that sent no logprobs: the documented error, or (missing_logprobs=
        answer_text) 1 / 0 for an answer whose first word is yes / no."""
        if self.missing_logprobs != "answer_text":
            raise VlmJudgeError(
                f"{self._where} sent no top logprobs for the answer to prompt {prompt!r}; mode yes_no needs "
                "a server that supports logprobs=True and top_logprobs (transformers serve ignores them): use "
                "reward.mode=rubric, or reward.missing_logprobs=answer_text to score yes as 1 and no as 0"
            )
        text = choice.message.content if choice.message is not None else None
        score = answer_text_score(text or "")
        if score is None:
            raise VlmJudgeError(
                f"{self._where} sent no logprobs and answered {_one_line(text)!r} for prompt {prompt!r}: "
                "its first word is neither yes nor no (reward.missing_logprobs=answer_text)"
            )
        if not self._warned_text:
            self._warned_text = True
            log.warning(
                "%s sends no logprobs: yes_no scores are read from the answers' text (yes 1, no 0; "
                "reward.missing_logprobs=answer_text), logged as reward/yes_no_from_text",
                self._where,
            )
        return score

    def score_one(self, image: np.ndarray, prompt: str) -> tuple[float, bool]:
        """The judge's score of one (H, W, 3) uint8 image for its prompt, and whether it was read from
        the answer's text."""
        return self._score(self._ask(image_data_url(image), self.question(prompt)), prompt)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        """(B,) scores; with mode yes_no and missing_logprobs=answer_text, the dict {"reward": (B,),
        "yes_no_from_text": (B,) 1.0 where the score was read from the answer's text}."""
        check_images(images, "vlm_judge")
        check_prompts(images, prompts)
        pixels = to_uint8(images)
        scored = _map_bounded(self.score_one, list(zip(pixels, prompts, strict=True)), self.max_concurrency)
        scores = torch.tensor([s for s, _ in scored], dtype=torch.float32)
        if self.mode == "yes_no" and self.missing_logprobs == "answer_text":
            return {"reward": scores, "yes_no_from_text": torch.tensor([float(t) for _, t in scored])}
        return scores


def _map_bounded(
    fn: Callable[[np.ndarray, str], tuple[float, bool]], items: list[tuple[np.ndarray, str]], workers: int
) -> list[tuple[float, bool]]:
    """fn over items with at most `workers` calls at a time; the results in the items' order. A failure
    cancels the calls not yet started and is raised (the first in the items' order)."""
    if not items:
        return []
    pool = ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="vlm_judge")
    futures: list[Future[tuple[float, bool]]] = [pool.submit(fn, *item) for item in items]
    try:
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check(
    modes: tuple[str, str], template: str, rubric_range: tuple[float, float], numbers: dict[str, float]
) -> None:
    """The options a server cannot check for us, as ConfigErrors naming the key."""
    mode, missing_logprobs = modes
    if mode not in MODES:
        raise ConfigError(f"reward.mode={mode} must be one of {', '.join(MODES)}")
    if missing_logprobs not in MISSING_LOGPROBS:
        raise ConfigError(
            f"reward.missing_logprobs={missing_logprobs} must be one of {', '.join(MISSING_LOGPROBS)}"
        )
    key = "reward.question_template" if mode == "yes_no" else "reward.rubric_template"
    try:
        filled = template.format(prompt="PROMPT", low=1, high=10)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"{key}={template!r} may use only the fields {{prompt}}, {{low}} and {{high}}: {err!r}"
        ) from err
    if "PROMPT" not in filled:
        raise ConfigError(f"{key}={template!r} must contain {{prompt}} (where the image's prompt goes)")
    if mode == "rubric" and not rubric_range[0] < rubric_range[1]:
        raise ConfigError(
            f"reward.rubric_min={rubric_range[0]} must be below reward.rubric_max={rubric_range[1]}"
        )
    if not 1 <= numbers["top_logprobs"] <= 20:
        raise ConfigError(
            f"reward.top_logprobs={numbers['top_logprobs']} must be from 1 to 20 (OpenAI's limit)"
        )
    if numbers["timeout_s"] <= 0 or numbers["max_retries"] < 0 or numbers["backoff_s"] < 0:
        raise ConfigError(
            f"reward.timeout_s={numbers['timeout_s']} must be > 0, reward.max_retries={numbers['max_retries']} "
            f"and reward.backoff_s={numbers['backoff_s']} >= 0"
        )
    if numbers["max_concurrency"] < 1 or numbers["max_tokens"] < 1:
        raise ConfigError(
            f"reward.max_concurrency={numbers['max_concurrency']} and reward.max_tokens={numbers['max_tokens']} "
            "must be >= 1"
        )


def vlm_judge(
    base_url: str = "http://127.0.0.1:8000/v1",
    model: str | None = None,
    mode: str = "yes_no",
    question_template: str = QUESTION_TEMPLATE,
    rubric_template: str = RUBRIC_TEMPLATE,
    rubric_min: float = 1.0,
    rubric_max: float = 10.0,
    top_logprobs: int = 20,
    missing_logprobs: str = "error",
    max_tokens: int | None = None,
    max_concurrency: int = 8,
    api_key_env: str | None = "OPENAI_API_KEY",
    api_key_file: str | None = None,
    **retry: Unpack[RetryPolicy],
) -> VlmJudge:
    """A VLM judge behind the OpenAI-compatible server at `base_url` (the URL ending in /v1); see the
    module docstring for the modes and the failure policy. max_tokens None: 1 (yes_no), 16 (rubric).
    Its timeout and retries are RetryPolicy's keywords (timeout_s default 120)."""
    timeout_s, max_retries, backoff_s, max_backoff_s = retry_settings(retry, timeout_s=120.0)
    try:
        import openai
    except ImportError as err:
        raise ConfigError("reward=vlm_judge needs the openai client: pip install -e '.[rewards]'") from err
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"reward.base_url={base_url} is not an http(s) URL like http://127.0.0.1:8000/v1")
    if not model:
        raise ConfigError(
            "reward.model is not set: give the name of the model the server serves (listed at <base_url>/models)"
        )
    template = question_template if mode == "yes_no" else rubric_template
    tokens = max_tokens if max_tokens is not None else (1 if mode == "yes_no" else 16)
    numbers = dict(
        top_logprobs=top_logprobs, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s
    )
    _check(
        (mode, missing_logprobs),
        template,
        (rubric_min, rubric_max),
        numbers | dict(max_concurrency=max_concurrency, max_tokens=tokens),
    )
    api_key = read_token(None, api_key_env, api_key_file, "reward.api_key_file") or "EMPTY"
    # retries are ours (logged, bounded, one-line error), so the client's own are off
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
    return VlmJudge(
        client,
        base_url.rstrip("/"),
        model,
        mode,
        template,
        (float(rubric_min), float(rubric_max)),
        top_logprobs,
        tokens,
        (max_retries, backoff_s, max_backoff_s),
        max_concurrency,
        missing_logprobs,
    )

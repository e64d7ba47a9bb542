"""The client of the reward server (rlcm_exp.serving; `python -m rlcm_exp.reward_server`): a reward
scored on another process or machine.

Protocol (JSON over HTTP, nothing pickled either way):

    POST /score   {"images": ["<base64 PNG or JPEG>", ...], "prompts": ["...", ...]}
    (or /score/<name>: the server's reward of that name; /score is its first)
      200         {"rewards": [float | null, ...], "status": ["ok" | "timeout" | "stuck" | "dead", ...],
                   "components": {"<name>": [float | null, ...]}}
                  (one number per image, in order; null = a non-finite score or an image not scored;
                  status "ok" = scored, else why not; components optional)
      4xx / 5xx   {"error": "<message>"}
    GET  /health  200 {"status": "ok" | "stuck" | "dead", "rewards": {"<name>": {"state": ...}},
                       "reward": <first>, "models": {...}, "max_batch": ..., ...}

    With a token, every request carries `Authorization: Bearer <token>`. The token is read from the
    environment variable `reward.token_env` (default RLCM_REWARD_TOKEN) or the file
    `reward.token_file`; `reward.token=...` inline works too but shows in `ps` (and is redacted from
    every config a run saves, see rlcm_exp.secrets).

Failure policy, so a run never trains on made-up rewards and never hangs on a dead server:
- connection refused/reset, timeouts, 502/503/504/429: retried at most `max_retries` times with
  exponential backoff (each retry logged), then a RewardServerError that stops the run;
- 400/401/403/404/413/500, malformed JSON, a wrong count of scores: a RewardServerError at once
  (retrying would get the same answer);
- images the server could not score (its reward call ran past the server's reward_timeout_s, or
  the reward is stuck or dead): NaN rewards (the trainer gives them zero advantage), with a
  warning counting them; if no image of a call was scored, a RewardServerError instead.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import math
import time
import urllib.parse
from typing import Any, Unpack

import torch

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import check_images, check_prompts, encode_image, to_uint8
from rlcm_exp.rewards.retry import RetryPolicy, backoff_delay, retry_settings
from rlcm_exp.secrets import DEFAULT_TOKEN_ENV, check_header_token, read_token, redact_url

log = logging.getLogger(__name__)

_RETRY_STATUS = {429, 502, 503, 504}
_MAX_RESPONSE_BYTES = 64 * 2**20


class RewardServerError(RuntimeError):
    """The reward server could not score a batch; the message says what happened and what to check."""


class _Retryable(Exception):
    """An attempt failed in a way another attempt may not."""


def encode_images(images: torch.Tensor, image_format: str = "png", jpeg_quality: int = 95) -> list[str]:
    """(B, 3, H, W) in [0, 1] -> B base64 strings of uint8 PNG (lossless) or JPEG files."""
    return [
        base64.b64encode(encode_image(img, image_format, jpeg_quality)).decode("ascii")
        for img in to_uint8(images)
    ]


def _scores(value: Any, n: int, what: str) -> torch.Tensor:
    """A JSON list of n numbers (null = non-finite) -> (n,) float32; anything else raises ValueError."""
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list")
    if len(value) != n:
        raise ValueError(f"{what} has {len(value)} scores for {n} images")
    if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value):
        raise ValueError(f"{what} holds something other than numbers and nulls")
    return torch.tensor([math.nan if v is None else float(v) for v in value], dtype=torch.float32)


class RemoteReward:
    """reward(images, prompts) scored by a reward server. Thread-safe: every request uses its own connection."""

    def __init__(
        self,
        url: str,
        token: str | None,
        timeout_s: float,
        max_retries: int,
        backoff_s: float,
        max_backoff_s: float,
        image_format: str,
        jpeg_quality: int,
        max_images_per_request: int,
        server_reward: str | None = None,
    ) -> None:
        shown = redact_url(url)  # credentials in the URL appear in no message, record or log
        try:
            parsed = urllib.parse.urlsplit(url)
            port = parsed.port
        except ValueError as err:  # a port that is not a number, or out of range
            raise ConfigError(f"reward.url={shown}: {err}; give a URL like http://127.0.0.1:8060") from None
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ConfigError(f"reward.url={shown} is not an http(s) URL like http://127.0.0.1:8060")
        if token is not None:
            check_header_token(token, "reward.token (or the file or variable it was read from)")
        if image_format not in ("png", "jpeg"):
            raise ConfigError(f"reward.image_format={image_format} must be png (lossless) or jpeg (smaller)")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0 or max_images_per_request < 1:
            raise ConfigError(
                f"reward.timeout_s={timeout_s} must be > 0, reward.max_retries={max_retries} and "
                f"reward.backoff_s={backoff_s} >= 0, reward.max_images_per_request={max_images_per_request} >= 1"
            )
        self.url = shown.rstrip("/")
        self._scheme, self._host, self._port = parsed.scheme, parsed.hostname, port
        self._base_path = parsed.path.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.max_images_per_request = max_images_per_request
        self.server_reward = server_reward
        self._score_path = (
            "/score" if server_reward is None else f"/score/{urllib.parse.quote(server_reward, safe='')}"
        )
        self.models: dict[str, str] = {"remote": self.url}

    def __repr__(self) -> str:  # never show the token in logs
        return f"RemoteReward(url={self.url!r}, token={'***' if self._token else None})"

    # ------------------------------------------------------------------ one HTTP exchange

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout_s)
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            # the server may refuse a request (413, 401) before reading its body and close the
            # socket; its answer can still be waiting to be read
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, self._base_path + path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read(_MAX_RESPONSE_BYTES + 1)
            if len(data) > _MAX_RESPONSE_BYTES:
                raise RewardServerError(
                    f"reward server {self.url} sent a response over {_MAX_RESPONSE_BYTES >> 20} MB"
                )
            return response.status, data
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, bad status line
            raise _Retryable(f"{type(err).__name__}: {err or 'connection failed'}") from err
        finally:
            conn.close()

    def _call(self, method: str, path: str, body: bytes | None) -> Any:
        """One exchange with bounded retries; returns the parsed JSON body of a 200 answer."""
        attempts = self.max_retries + 1
        start = time.monotonic()
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                status, data = self._request(method, path, body)
                if status in _RETRY_STATUS:
                    raise _Retryable(f"HTTP {status}: {_error_text(data)}")
            except _Retryable as err:
                last = str(err)
                if attempt == attempts:
                    break
                delay = backoff_delay(attempt, self.backoff_s, self.max_backoff_s)
                log.warning(
                    "reward server %s%s: %s; retry %d/%d in %.1fs",
                    self.url,
                    path,
                    last,
                    attempt,
                    self.max_retries,
                    delay,
                )
                time.sleep(delay)
                continue
            if status != 200:
                raise RewardServerError(_status_message(self.url, path, status, _error_text(data)))
            try:
                return json.loads(data)
            except ValueError as err:
                raise RewardServerError(
                    f"reward server {self.url}{path} answered HTTP 200 with a body that is not JSON "
                    f"({err}; it starts {data[:80]!r}). Is reward.url pointing at an rlcm_exp reward server?"
                ) from err
        raise RewardServerError(
            f"reward server {self.url} did not answer {path} after {attempts} attempt(s) over "
            f"{time.monotonic() - start:.1f}s (last error: {last}). Is it running and reachable? Start it with "
            f"`python -m rlcm_exp.reward_server reward=<name> port={self._port or 80}` on that machine, or fix "
            "reward.url; a slow server needs a larger reward.timeout_s."
        )

    # ------------------------------------------------------------------ public

    def health(self) -> dict[str, Any]:
        """The server's /health answer (its reward, models and limits)."""
        answer = self._call("GET", "/health", None)
        if not isinstance(answer, dict):
            raise RewardServerError(
                f"reward server {self.url}/health answered {str(answer)[:200]}, not an object"
            )
        rewards = answer.get("rewards")
        if isinstance(rewards, dict) and rewards:  # a server of several rewards: only ours matters
            name = self.server_reward or next(iter(rewards))
            if name not in rewards:
                raise RewardServerError(
                    f"reward server {self.url} serves no reward {name!r} (reward.server_reward); it serves "
                    f"{', '.join(map(str, rewards))}"
                )
            state = rewards[name].get("state") if isinstance(rewards[name], dict) else None
        else:
            state = answer.get("status")
        if state != "ok":
            raise RewardServerError(
                f"reward server {self.url}/health says its reward is {state!r}, not ok: {str(answer)[:300]}"
            )
        return answer

    def wait_until_ready(self, wait_s: float) -> dict[str, Any]:
        """Poll /health until the server answers (it may still be loading models), for at most wait_s seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.health()
            except RewardServerError as err:
                if time.monotonic() >= deadline or "did not answer" not in str(err):
                    raise
                log.warning(
                    "waiting for the reward server at %s (%.0fs left)", self.url, deadline - time.monotonic()
                )
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | dict[str, torch.Tensor]:
        check_images(images, "remote reward")
        check_prompts(images, prompts)
        parts: list[tuple[dict[str, torch.Tensor], list[str]]] = []
        for i in range(0, len(images), self.max_images_per_request):
            chunk, chunk_prompts = (
                images[i : i + self.max_images_per_request],
                list(prompts[i : i + self.max_images_per_request]),
            )
            body = json.dumps(
                {
                    "images": encode_images(chunk, self.image_format, self.jpeg_quality),
                    "prompts": chunk_prompts,
                }
            ).encode()
            parts.append(self._parse_answer(self._call("POST", self._score_path, body), len(chunk)))
        if not parts:
            return torch.zeros(0)
        return self._merge(parts)

    def _parse_answer(self, answer: Any, n: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """A /score answer for n images -> their scores and statuses; RewardServerError if malformed."""
        try:
            if not isinstance(answer, dict):
                raise ValueError(f"the answer is a JSON {type(answer).__name__}, not an object")
            scores = {"reward": _scores(answer.get("rewards"), n, "'rewards'")}
            for name, values in (answer.get("components") or {}).items():
                scores[str(name)] = _scores(values, n, f"component {name!r}")
            status = answer.get("status", ["ok"] * n)  # servers before per-image statuses scored all
            if (
                not isinstance(status, list)
                or len(status) != n
                or not all(isinstance(s, str) for s in status)
            ):
                raise ValueError(f"'status' is not a list of {n} strings")
        except ValueError as err:
            raise RewardServerError(
                f"reward server {self.url}/score sent a malformed answer for {n} images: {err}. "
                "Client and server versions may differ; a reward that returns a wrong count is a bug in it."
            ) from err
        for values in scores.values():  # an image not scored has no score, whatever was sent
            values[torch.tensor([s != "ok" for s in status], dtype=torch.bool)] = math.nan
        return scores, status

    def _merge(
        self, parts: list[tuple[dict[str, torch.Tensor], list[str]]]
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The scores of all requests of a call; unscored images are NaN (counted in a warning), or a
        RewardServerError when no image was scored."""
        status = [s for _, part in parts for s in part]
        unscored = [s for s in status if s != "ok"]
        if unscored and len(unscored) == len(status):
            raise RewardServerError(
                f"reward server {self.url}: none of {len(status)} images was scored ({', '.join(sorted(set(unscored)))}): "
                "its reward ran past the server's reward_timeout_s or is stuck or dead; see its /health and log."
            )
        if unscored:
            log.warning(
                "reward server %s: %d of %d images not scored (%s); their rewards are NaN (zero advantage)",
                self.url,
                len(unscored),
                len(status),
                ", ".join(sorted(set(unscored))),
            )
        keys = dict.fromkeys(k for scores, _ in parts for k in scores)  # a part not scored has no components
        merged = {k: torch.cat([p.get(k, torch.full((len(s),), math.nan)) for p, s in parts]) for k in keys}
        return merged["reward"] if len(merged) == 1 else merged


def _error_text(data: bytes) -> str:
    try:
        answer = json.loads(data)
        if isinstance(answer, dict) and "error" in answer:
            return str(answer["error"])
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace")


_TOKEN_HINT = (
    "Set the token the server was started with in $RLCM_REWARD_TOKEN (or the variable reward.token_env "
    "names), in a file (reward.token_file=PATH) or as reward.token."
)


def _status_message(url: str, path: str, status: int, text: str) -> str:
    hint = {
        400: "The request was malformed; client and server versions may differ.",
        401: _TOKEN_HINT,
        403: _TOKEN_HINT,
        404: "reward.url should be the server's root, e.g. http://127.0.0.1:8060.",
        413: "Lower reward.max_images_per_request, or start the server with a larger max_request_mb.",
        500: "The reward raised an exception on the server; its log has the traceback.",
    }.get(status, "")
    return f"reward server {url}{path} answered HTTP {status}: {text}. {hint}".strip()


def remote(
    url: str = "http://127.0.0.1:8060",
    token: str | None = None,
    image_format: str = "png",
    jpeg_quality: int = 95,
    max_images_per_request: int = 32,
    wait_for_server_s: float = 0.0,
    token_env: str | None = DEFAULT_TOKEN_ENV,
    token_file: str | None = None,
    server_reward: str | None = None,
    **retry: Unpack[RetryPolicy],
) -> RemoteReward:
    """A reward scored by `python -m rlcm_exp.reward_server` at `url`; see the module docstring for the policy.

    Its timeout and retries are RetryPolicy's keywords (timeout_s default 300). The token is `token`
    if given, else the first line of `token_file`, else the environment variable `token_env` (unset:
    no token). With wait_for_server_s > 0, building it waits (polling /health) until the server is
    up, so a run started next to a server that is still loading models fails fast only if it never
    comes up.
    """
    timing = retry_settings(retry, timeout_s=300.0)
    if token:
        log.warning(
            "reward.token is given inline: on a command line it shows in `ps` and shell history; prefer "
            "$%s (reward.token_env) or reward.token_file. Run dirs keep it redacted.",
            token_env or DEFAULT_TOKEN_ENV,
        )
    client = RemoteReward(
        url,
        read_token(token, token_env, token_file, "reward.token_file"),
        *timing,
        image_format,
        jpeg_quality,
        max_images_per_request,
        server_reward,
    )
    if wait_for_server_s > 0:
        info = client.wait_until_ready(wait_for_server_s)
        client.models = {
            "remote": client.url,
            **{str(k): str(v) for k, v in (info.get("models") or {}).items()},
        }
        log.info("reward server %s serves %s with %s", client.url, info.get("reward"), info.get("models"))
    return client

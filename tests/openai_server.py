"""A small real OpenAI-compatible chat-completions server for tests (standard library http.server),
serving POST /v1/chat/completions on 127.0.0.1 with deterministic answers:

- it refuses (HTTP 400) a request without a model, without a user message holding a PNG data URL
  that decodes, or without a text part (the question); with `api_key` set, any other bearer key is
  refused with HTTP 401;
- p = mean of the image's red channel / 255 if the question mentions "red", else 1 - that mean;
- with logprobs requested: the answer token "Yes" or "No", and its top alternatives
  "Yes" (0.6 p), " yes" (0.3 p), "No" (0.9 (1 - p)), "maybe" (0.1): so P(yes) / (P(yes) + P(no)) = p;
- otherwise (a rubric question) the text "Score: N" with N = round(1 + 9 p), or `text` if set;
- `delay_s` sleeps before answering (`max_in_flight` counts the requests held at once); `logprobs=False` answers without logprobs even when asked;
  `choices` is the number of choices in each answer (copies of the one above; 1 unless a test wants a wrong count).

Every accepted request is recorded in `requests` (its JSON body, question and Authorization header).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

DATA_URL = "data:image/png;base64,"


@dataclass
class Behaviour:
    api_key: str | None = None
    delay_s: float = 0.0
    logprobs: bool = True
    text: str | None = None
    choices: int = 1
    requests: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0  # the most requests the server held at once
    lock: threading.Lock = field(default_factory=threading.Lock)


def _parse(body: dict[str, Any]) -> tuple[np.ndarray, str]:
    """The image (H, W, 3 uint8) and the question of a chat request; ValueError says what is missing."""
    if not body.get("model"):
        raise ValueError("no model")
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages and messages[-1].get("role") == "user" else None
    if not isinstance(content, list):
        raise ValueError("the last message is not a user message with a list of parts")
    urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    texts = [p["text"] for p in content if p.get("type") == "text"]
    if len(urls) != 1 or not urls[0].startswith(DATA_URL) or len(texts) != 1 or not texts[0].strip():
        raise ValueError("expected one PNG data URL and one question")
    image = Image.open(io.BytesIO(base64.b64decode(urls[0][len(DATA_URL) :])))
    if image.format != "PNG":
        raise ValueError(f"the image is {image.format}, not PNG")
    return np.asarray(image.convert("RGB")), texts[0]


def _logprobs(p: float) -> dict[str, Any]:
    alternatives = [("Yes", 0.6 * p), (" yes", 0.3 * p), ("No", 0.9 * (1 - p)), ("maybe", 0.1)]
    top = [{"token": t, "logprob": math.log(max(q, 1e-30)), "bytes": None} for t, q in alternatives]
    first = top[max(range(len(top)), key=lambda i: alternatives[i][1])]
    return {"content": [{**first, "top_logprobs": top}], "refusal": None}


def answer(behaviour: Behaviour, body: dict[str, Any]) -> dict[str, Any]:
    """The chat completion for one request (deterministic in the request and the behaviour)."""
    image, question = _parse(body)
    red = float(image[..., 0].mean()) / 255
    p = red if "red" in question.lower() else 1 - red
    with_logprobs = bool(body.get("logprobs")) and behaviour.logprobs
    if with_logprobs:
        lp = _logprobs(p)
        text = lp["content"][0]["token"]
    else:
        lp, text = None, behaviour.text if behaviour.text is not None else f"Score: {round(1 + 9 * p)}"
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    return {
        "id": f"chatcmpl-{len(behaviour.requests)}",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [{**choice, "index": i, "logprobs": lp} for i in range(behaviour.choices)],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def do_POST(self) -> None:
        behaviour = self.server.behaviour
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        auth = self.headers.get("Authorization")
        if behaviour.api_key is not None and auth != f"Bearer {behaviour.api_key}":
            return self._send(401, {"error": {"message": "invalid api key"}})
        try:
            result = answer(behaviour, body)
        except (ValueError, KeyError, OSError) as err:
            return self._send(400, {"error": {"message": f"bad request: {err}"}})
        with behaviour.lock:
            behaviour.requests.append({"body": body, "question": _parse(body)[1], "authorization": auth})
            behaviour.in_flight += 1
            behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.in_flight)
        try:
            time.sleep(behaviour.delay_s)
            self._send(200, result)
        finally:
            with behaviour.lock:
                behaviour.in_flight -= 1


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


def start(behaviour: Behaviour) -> tuple[_Server, str]:
    """Serve on 127.0.0.1 at a free port in a daemon thread; returns the server and its /v1 URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.behaviour = behaviour
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def stop(server: _Server) -> None:
    server.shutdown()
    server.server_close()

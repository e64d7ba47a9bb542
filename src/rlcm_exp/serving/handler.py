"""The reward server's HTTP handler: GET /health, POST /score (the first reward) and POST
/score/<name> (a named one), each request under a whole-request deadline and a minimum upload rate,
its body reserved in the pending-body budget as its bytes arrive."""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import socket
import sys
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import torch

from rlcm_exp.serving.batcher import DEAD, OK, STUCK, Batcher, Budget, RewardCrashed, assemble
from rlcm_exp.serving.connections import DeadlineReader
from rlcm_exp.serving.options import ServerOptions
from rlcm_exp.serving.requests import RequestError, decode_opened, open_score_request, score_answer

_DRAIN_LIMIT = 1 << 30  # bytes of a refused request still read (and dropped) before closing
_DRAIN_S = 30.0  # ... and for at most this long (or request_timeout_s if shorter)
_UNKNOWN_DRAIN_S = 1.0  # how long to read and drop a body of unknown length (bad Content-Length)
_QUEUE_WAIT_S = 60.0  # how long a request waits for room in the pixel budget before a 503
_BODY_WAIT_S = 1.0  # how long a body's next chunk waits for room in the pending-body budget before a 503
_CHUNK = 1 << 16  # bytes read (and reserved) at a time
_READ_BUFFER = 1 << 16  # bytes of the buffered reader over a connection's socket


@dataclass
class ServedReward:
    """One reward of the server: its batcher (worker thread, timeout, state) and what /health shows."""

    batcher: Batcher
    target: str  # its config's _target_
    models: dict[str, str] = field(default_factory=dict)  # what it loaded (its `models` attribute)

    def health(self) -> dict[str, Any]:
        return {
            "state": self.batcher.state(),
            "target": self.target,
            "models": self.models,
            "reward_calls": self.batcher.calls,
        }


def worst(states: list[str]) -> str:
    """DEAD if any is dead, else STUCK if any is stuck, else OK."""
    return next((s for s in (DEAD, STUCK) if s in states), OK)


class RewardHandler(BaseHTTPRequestHandler):
    """GET /health and POST /score[/<name>]; `make_handler` binds the rewards, options and /health
    info to it.

    Every request gets an answer: what a handler did not foresee (SystemExit included) is logged
    and answered 500, and the server goes on serving the next request. A request that does not
    arrive in time is dropped: its headers within request_timeout_s, its body at min_upload_kb_s.
    """

    server_version = "rlcm-reward-server/1"
    protocol_version = "HTTP/1.1"
    rewards: ClassVar[
        dict[str, ServedReward]
    ]  # name -> reward, in the order given (the first is the default)
    options: ClassVar[ServerOptions]
    info: ClassVar[dict[str, Any]]
    bodies: ClassVar[Budget]  # bytes of request bodies received and not yet decoded (max_pending_mb)
    reader: DeadlineReader
    _answered = False

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader, _READ_BUFFER)

    def handle_one_request(self) -> None:
        # the deadline runs from the accept (or the previous answer): an idle keep-alive counts too
        self.reader.begin(self.options.request_timeout_s)
        super().handle_one_request()

    def _send(
        self, status: HTTPStatus, payload: dict[str, Any], close: bool = False, drain: bool = True
    ) -> None:
        """Answer; with close=True the unread body is dropped (read for a bounded time unless
        drain=False) and the connection closed."""
        self._answered = True
        body = json.dumps(payload).encode()
        self.connection.settimeout(self.options.request_timeout_s)  # a client that does not read is dropped
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="reward"')
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        if close:
            # the body was not read, so the connection cannot carry another request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)
        if close and drain:
            self._drain()

    def _drain(self) -> None:
        """Read and drop an unread request body (in chunks, so no memory is held), up to a cap.

        Closing a socket with unread data makes the kernel send a reset, which can destroy the
        answer we just sent before the client reads it; the client would see "connection reset"
        instead of a clear 413/401. A body of unknown length is read for at most a second, any
        other for at most min(30 s, request_timeout_s).
        """
        length = _content_length(self.headers.get_all("Content-Length") or [])
        left = _DRAIN_LIMIT if length is None else min(length, _DRAIN_LIMIT)
        self.reader.begin(
            min(_UNKNOWN_DRAIN_S if length is None else _DRAIN_S, self.options.request_timeout_s)
        )
        with contextlib.suppress(OSError):  # TimeoutError included: the deadline ends the drain
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees it now
            while left > 0:
                if not (chunk := self.rfile.read1(min(left, 1 << 16))):
                    break
                left -= len(chunk)

    def _guarded(self, handle: Callable[[], None]) -> None:
        self._answered = False
        try:
            handle()
        except TimeoutError:  # the request came too slowly: say so (without waiting), then close
            self.log_error("request too slow, dropped (request_timeout_s, min_upload_kb_s)")
            if not self._answered:
                with contextlib.suppress(OSError):
                    message = "the request did not arrive in time (request_timeout_s, min_upload_kb_s)"
                    self._send(HTTPStatus.REQUEST_TIMEOUT, {"error": message}, close=True, drain=False)
            self.close_connection = True
        except ConnectionError:  # the client went away: nobody to answer
            self.close_connection = True
        except BaseException as err:  # noqa: BLE001 (a handler thread must answer whatever happened)
            self.log_error("unexpected error: %s", traceback.format_exc())
            if not self._answered:
                with contextlib.suppress(OSError):
                    self._send(
                        HTTPStatus.INTERNAL_SERVER_ERROR,
                        {"error": f"internal error ({type(err).__name__}); the server log has the traceback"},
                        close=True,
                    )
            self.close_connection = True

    def _authorized(self) -> bool:
        if self.options.token is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:].encode("latin-1") if header.startswith("Bearer ") else b""
        # constant time: no guessing by timing (the token is Latin-1, checked at start)
        return hmac.compare_digest(given, self.options.token.encode("latin-1"))

    def do_GET(self) -> None:
        self._guarded(self._get)

    def _get(self) -> None:
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"})
        elif urllib.parse.urlsplit(self.path).path.rstrip("/") == "/health":
            self._send(HTTPStatus.OK, self._health())
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no GET {self.path}; try /health"})

    def _health(self) -> dict[str, Any]:
        """The server's info, each reward's state (ok / stuck / dead) and the worst as "status"."""
        rewards = {name: served.health() for name, served in self.rewards.items()}
        calls = sum(r["reward_calls"] for r in rewards.values())
        status = worst([r["state"] for r in rewards.values()])
        connections = getattr(self.server, "open_connections", None)
        return {
            **self.info,
            "status": status,
            "reward_calls": calls,
            "rewards": rewards,
            "connections": connections,
        }

    def _route(self) -> ServedReward | None:
        """The reward POST /score (the first) or /score/<name> names, or None after a 404."""
        path = urllib.parse.urlsplit(self.path).path.rstrip("/")
        name = next(iter(self.rewards)) if path == "/score" else None
        if path.startswith("/score/"):
            name = urllib.parse.unquote(path[len("/score/") :])
        if name in self.rewards:
            return self.rewards[name]
        names = ", ".join(f"/score/{n}" for n in self.rewards)
        self._send(
            HTTPStatus.NOT_FOUND,
            {"error": f"no POST {self.path}; try /score (the first reward) or {names}"},
            close=True,
        )
        return None

    def _score_target(self) -> tuple[ServedReward, int] | None:
        """The reward a /score request names and its body's length, or None after answering why it
        is refused. Nothing of the body is read before its length is known and within the limits."""
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"}, close=True)
            return None
        served = self._route()
        if served is None:
            return None
        values = self.headers.get_all("Content-Length") or []
        if "Transfer-Encoding" in self.headers or not values:
            self._send(
                HTTPStatus.LENGTH_REQUIRED,
                {"error": "Content-Length required (chunked bodies are not accepted)"},
                close=True,
            )
            return None
        length = _content_length(values)
        if length is None:
            self._send(
                HTTPStatus.BAD_REQUEST,
                {"error": f"Content-Length {', '.join(values)!r} is not one non-negative integer"},
                close=True,
            )
            return None
        if length > self.options.max_request_bytes:
            self._send(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"request of {length} bytes is over max_request_mb={self.options.max_request_mb}"},
                close=True,
            )
            return None
        return served, length

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _post(self) -> None:
        found = self._score_target()
        if found is None:
            return
        served, length = found
        self.reader.body(self.options.min_upload_bytes_s)
        body = self._read_body(length)
        if body is None:
            return
        try:
            prepared = self._prepare(served, body)
        finally:
            self.bodies.release(length)
            del body  # only the decoded pixels stay in memory while the request waits
        if prepared is None:
            return
        images, prompts, pixels = prepared
        try:
            self._score(served, images, prompts)
        finally:
            del images  # freed before its pixels are handed to the next request
            served.batcher.pixels.release(pixels)

    def _read_body(self, length: int) -> bytearray | None:
        """The body, each chunk reserved in the pending-body budget as it arrives (so a client that
        declares a large body and sends it slowly holds only what it sent); None after a 503 when
        the budget stays full. The caller releases `length` once done with it."""
        body = bytearray()
        try:
            while len(body) < length:
                chunk = self.rfile.read1(min(length - len(body), _CHUNK))
                if not chunk:
                    raise ConnectionError("the client closed the connection before sending its body")
                if not self.bodies.acquire(len(chunk), _BODY_WAIT_S):
                    raise _BudgetFull
                body += chunk
        except _BudgetFull:
            self.bodies.release(len(body))
            self._busy("request bodies in memory are at max_pending_mb", close=True)
            return None
        except BaseException:
            self.bodies.release(len(body))
            raise
        return body

    def _prepare(self, served: ServedReward, body: bytearray) -> tuple[torch.Tensor, list[str], int] | None:
        """(images decoded, prompts, pixels reserved) of a body, or None after answering: a bad
        request, a full pixel budget, or a stuck or dead reward (its items marked, nothing decoded)."""
        try:
            opened = open_score_request(body, self.options.max_pixels, self.options.max_request_pixels)
            if (state := served.batcher.state()) != OK:
                self._answer(score_answer(assemble(len(opened.images), [], state)))
                return None
            if not served.batcher.pixels.acquire(opened.pixels, _QUEUE_WAIT_S):
                self._busy("the decoded images waiting to be scored are at max_queue_pixels")
                return None
            try:
                images = decode_opened(opened.images)
            except BaseException:
                served.batcher.pixels.release(opened.pixels)
                raise
        except RequestError as err:
            self._send(err.status, {"error": str(err)})
            return None
        return images, opened.prompts, opened.pixels

    def _score(self, served: ServedReward, images: torch.Tensor, prompts: list[str]) -> None:
        try:
            scored = served.batcher.score(images, prompts)
        except Exception as err:
            what = str(err) if isinstance(err, RewardCrashed) else f"{type(err).__name__}: {err}"
            self.log_error("reward failed: %s", what)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the reward raised {what}"})
            return
        self._answer(score_answer(scored))

    def _answer(self, payload: dict[str, Any]) -> None:
        unscored = [s for s in payload["status"] if s != OK]
        if unscored:
            self.log_error(
                "%d of %d images not scored (%s)", len(unscored), len(payload["status"]), unscored[0]
            )
        self._send(HTTPStatus.OK, payload)

    def _busy(self, why: str, close: bool = False) -> None:
        # 503: the client retries later (rlcm_exp.rewards.remote retries 503 with backoff)
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"server busy: {why}; retry later"}, close=close)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        sys.stderr.write(f"[reward_server] {self.address_string()} {format % args}\n")


class _BudgetFull(Exception):
    """No room in the pending-body budget for the next chunk of a body."""


def _content_length(values: list[str]) -> int | None:
    """The one Content-Length of a request, or None when it is not one non-negative integer (-1,
    "+5", "1_0", two different values: reading such a body would be unbounded or ambiguous)."""
    if len(set(values)) != 1 or not values[0].strip().isdigit() or not values[0].strip().isascii():
        return None
    return int(values[0].strip())


def make_handler(
    rewards: dict[str, ServedReward], options: ServerOptions, info: dict[str, Any]
) -> type[RewardHandler]:
    """A RewardHandler subclass bound to this server's rewards, options, body budget and /health info."""
    bodies = Budget(options.max_pending_bytes)
    attrs = {
        "rewards": rewards,
        "options": options,
        "info": info,
        "bodies": bodies,
        "timeout": options.request_timeout_s,  # socket timeout until the reader sets its own
    }
    return type("Handler", (RewardHandler,), attrs)

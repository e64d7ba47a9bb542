"""The reward server: options, composing the reward config, the HTTP handler, and `start`.

The protocol is JSON; see rlcm_exp/rewards/remote.py (the client, `reward=remote`). Images arrive
as base64 PNG or JPEG and are decoded by PIL under a pixel limit; nothing is ever unpickled.
Concurrent requests are queued and merged into batches of up to max_batch images (batcher.py),
so several trainer processes share one model efficiently.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import io
import ipaddress
import json
import math
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from rlcm_exp.configs import conf_dir
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import RewardFn, build_reward
from rlcm_exp.secrets import DEFAULT_TOKEN_ENV
from rlcm_exp.serving.batcher import Batcher, Budget

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_DRAIN_LIMIT = 1 << 30  # bytes of a refused request still read (and dropped) before closing
_DRAIN_S = 30.0  # ... and for at most this long
_UNKNOWN_DRAIN_S = 1.0  # how long to read and drop a body of unknown length (bad Content-Length)
# Values (commas, arrays, objects) a /score body may hold: a real one holds about two per image
# and per prompt. Bounds the memory json.loads may build from a small body ("[{},{},...]" turns
# 3 bytes into a 64-byte dict): at most ~25 MB for this many empty containers.
_MAX_JSON_VALUES = 1 << 18
_QUEUE_WAIT_S = 60.0  # how long a request waits for room in the pixel budget before a 503
BYTES_PER_PIXEL = 16  # memory of one reserved pixel: float32 RGB (12) + its uint8 decode (3), rounded up
BYTES_PER_BODY_BYTE = 3  # memory of one body byte until decoded: the body, its JSON strings, base64-decoded


@dataclass
class ServerOptions:
    """The server keys of `python -m rlcm_exp.reward_server` (see its usage text), with defaults.

    Memory: requests never hold more than about BYTES_PER_BODY_BYTE * max_pending_mb (bodies read,
    not yet decoded) + BYTES_PER_PIXEL * max_queue_pixels (decoded images queued or being scored);
    with the defaults, 768 MB + 1 GiB, besides the reward's own models and activations.
    """

    host: str = "127.0.0.1"  # bind address; another than loopback needs a token (or allow_insecure)
    port: int = 8060  # TCP port; 0 lets the OS pick a free one (printed at start)
    token: str | None = None  # the shared secret itself (shows in `ps`: prefer token_env or token_file)
    token_env: str | None = DEFAULT_TOKEN_ENV  # environment variable holding the token
    token_file: str | None = None  # file holding the token (first line)
    allow_insecure: bool = False  # serve a non-loopback host without a token (anyone may use the reward)
    max_request_mb: float = 64.0  # largest accepted request body, MB (2**20 bytes)
    max_pending_mb: float = 256.0  # request bodies read but not yet decoded, all requests together, MB
    max_pixels: int = 4096 * 4096  # largest accepted image, pixels (decompression-bomb guard)
    max_request_pixels: int = 4096 * 4096  # decoded pixels of one request (64 images of 512x512)
    max_queue_pixels: int = 4 * 4096 * 4096  # decoded pixels of all requests waiting or being scored
    max_batch: int = 32  # most images per reward call when merging requests
    max_wait_ms: float = 10.0  # how long the batcher waits for more requests before scoring, ms
    device: str | None = None  # passed to rewards whose builder takes `device`; None = cuda if available
    config_dir: str | None = (
        None  # Hydra config root holding reward/; None = the configs shipped with rlcm_exp
    )

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def max_pending_bytes(self) -> int:
        return int(self.max_pending_mb * 2**20)

    def check(self) -> None:
        """ConfigError naming the key when a limit is out of range."""
        for key in ("max_batch", "max_pixels", "max_request_pixels", "max_queue_pixels"):
            if getattr(self, key) < 1:
                raise ConfigError(f"reward_server {key}={getattr(self, key)}: must be a positive integer.")
        for key in ("max_request_mb", "max_pending_mb"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"reward_server {key}={getattr(self, key)}: must be positive.")
        if self.max_wait_ms < 0:
            raise ConfigError(f"reward_server max_wait_ms={self.max_wait_ms}: must be >= 0.")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"reward_server port={self.port}: must be in 0..65535 (0 picks a free one).")
        if self.max_queue_pixels < self.max_request_pixels or self.max_pending_mb < self.max_request_mb:
            raise ConfigError(
                f"reward_server max_queue_pixels={self.max_queue_pixels} must be >= max_request_pixels="
                f"{self.max_request_pixels}, and max_pending_mb={self.max_pending_mb} >= max_request_mb="
                f"{self.max_request_mb}: otherwise a request within the limits could never be served."
            )


def compose_reward_config(overrides: list[str], config_dir: str | Path | None = None) -> Any:
    """The `reward` node composed from <config_dir>/reward/ (default: the shipped configs) with the
    given Hydra overrides (`+reward=NAME`, `reward.key=value`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    folder = Path(config_dir).resolve() if config_dir is not None else conf_dir()
    if not (folder / "reward").is_dir():
        raise ConfigError(
            f"reward_server config_dir={folder}: no reward/ config group there. Pass config_dir=/path/to/conf "
            "(a folder holding reward/NAME.yaml), or leave it out to use the configs shipped with rlcm_exp."
        )
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name="reward_server"):
            cfg = compose(config_name=None, overrides=overrides)
    except HydraException as err:
        names = sorted(p.stem for p in (folder / "reward").glob("*.yaml"))
        raise ConfigError(f"reward_server: {err}. Available rewards: {', '.join(names)}.") from err
    OmegaConf.resolve(cfg)
    return cfg.reward


# ----------------------------------------------------------------------------- requests


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _too_large(message: str) -> RequestError:
    return RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)


def open_images(
    items: Any, max_pixels: int, max_request_pixels: int | None = None
) -> tuple[list[Image.Image], int]:
    """A JSON list of base64 PNG/JPEG strings -> the images opened (only their headers read, no pixel
    decoded yet) and their total pixel count; 400/413 for bad, mixed-size or too many pixels."""
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'images' must be a non-empty list of base64 strings")
    opened: list[Image.Image] = []
    total = 0
    for i, text in enumerate(items):
        try:
            raw = base64.b64decode(text, validate=True)
            # formats=: PIL tries no other decoder, so only PNG and JPEG parsers ever see client bytes
            image = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
        except Image.DecompressionBombError as err:  # declared dimensions far over PIL's own limit
            raise _too_large(f"image {i}: {err}; over max_pixels={max_pixels}") from err
        except Exception as err:  # binascii.Error, UnidentifiedImageError, and PIL's parser errors
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"image {i} is not a base64 PNG or JPEG: {err}"
            ) from err
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise _too_large(f"image {i} has {width}x{height} pixels, over max_pixels={max_pixels}")
        if image.size != (first := opened[0] if opened else image).size:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"image {i} is {width}x{height} but image 0 is {first.size[0]}x{first.size[1]}; "
                "one request holds images of one size",
            )
        total += width * height
        if max_request_pixels is not None and total > max_request_pixels:
            raise _too_large(
                f"the request's {len(items)} images have over max_request_pixels={max_request_pixels} "
                f"pixels together ({len(items)} x {width}x{height}); send fewer images per request "
                "(reward.max_images_per_request)"
            )
        opened.append(image)
    return opened, total


def decode_opened(opened: list[Image.Image]) -> torch.Tensor:
    """Images of one size from `open_images` -> (B, 3, H, W) float32 in [0, 1]; 400 if one does not decode."""
    width, height = opened[0].size
    pixels = np.empty((len(opened), height, width, 3), dtype=np.uint8)
    for i, image in enumerate(opened):
        try:
            pixels[i] = np.asarray(image.convert("RGB"))
        except Exception as err:  # truncated or corrupt data: PIL raises OSError, ValueError, SyntaxError...
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image {i} could not be decoded: {err}") from err
        finally:
            image.close()
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)


def decode_images(items: Any, max_pixels: int, max_request_pixels: int | None = None) -> torch.Tensor:
    """A JSON list of base64 PNG/JPEG strings -> (B, 3, H, W) float32 in [0, 1]; all images one size."""
    return decode_opened(open_images(items, max_pixels, max_request_pixels)[0])


def load_json(body: bytes) -> Any:
    """json.loads of a request body, refusing (400) bodies that would build far more objects than
    their size suggests, or nest so deep that the parser recurses out."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") > _MAX_JSON_VALUES:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body holds over {_MAX_JSON_VALUES} JSON values")
    try:
        return json.loads(body)
    except RecursionError as err:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body's JSON is nested too deeply") from err
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError, too many int digits
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {err}") from err


@dataclass
class OpenedRequest:
    images: list[Image.Image]  # opened, not decoded (decode_opened)
    prompts: list[str]
    pixels: int  # what decoding them will hold, in pixels


def open_score_request(body: bytes, max_pixels: int, max_request_pixels: int | None) -> OpenedRequest:
    """A /score body -> its images opened (not decoded) and prompts; RequestError (400/413) when malformed."""
    request = load_json(body)
    if not isinstance(request, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    prompts = request.get("prompts")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'prompts' must be a list of strings")
    images, pixels = open_images(request.get("images"), max_pixels, max_request_pixels)
    if len(prompts) != len(images):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{len(images)} images but {len(prompts)} prompts")
    return OpenedRequest(images, prompts, pixels)


def parse_score_request(
    body: bytes, max_pixels: int, max_request_pixels: int | None = None
) -> tuple[torch.Tensor, list[str]]:
    """A /score body -> (images, prompts); RequestError (400/413) when it is malformed."""
    opened = open_score_request(body, max_pixels, max_request_pixels)
    return decode_opened(opened.images), opened.prompts


def _json_numbers(t: torch.Tensor) -> list[float | None]:
    # JSON has no NaN/inf: non-finite scores travel as null and the client turns them back into NaN
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


def score_answer(scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The /score answer: {"rewards": [...], "components": {name: [...]}} (components only if any)."""
    payload: dict[str, Any] = {"rewards": _json_numbers(scores["reward"])}
    components = {k: _json_numbers(v) for k, v in scores.items() if k != "reward"}
    if components:
        payload["components"] = components
    return payload


# ----------------------------------------------------------------------------- HTTP


class RewardHandler(BaseHTTPRequestHandler):
    """GET /health and POST /score; `make_handler` binds a batcher, options and /health info to it.

    Every request gets an answer: what a handler did not foresee is logged and answered 500, and
    the server goes on serving the next request.
    """

    server_version = "rlcm-reward-server/1"
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may take to send its request; a stalled one frees its thread
    batcher: ClassVar[Batcher]
    options: ClassVar[ServerOptions]
    info: ClassVar[dict[str, Any]]
    bodies: ClassVar[Budget]  # bytes of request bodies read and not yet decoded (max_pending_mb)
    _answered = False

    def _send(self, status: HTTPStatus, payload: dict[str, Any], close: bool = False) -> None:
        """Answer; with close=True the unread body is dropped and the connection closed."""
        self._answered = True
        body = json.dumps(payload).encode()
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
        if close:
            self._drain()

    def _drain(self) -> None:
        """Read and drop an unread request body (in chunks, so no memory is held), up to a cap.

        Closing a socket with unread data makes the kernel send a reset, which can destroy the
        answer we just sent before the client reads it; the client would see "connection reset"
        instead of a clear 413/401. A body of unknown length is read for at most a second.
        """
        length = _content_length(self.headers.get_all("Content-Length") or [])
        left = _DRAIN_LIMIT if length is None else min(length, _DRAIN_LIMIT)
        deadline = time.monotonic() + (_UNKNOWN_DRAIN_S if length is None else _DRAIN_S)
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: the client sees it now
            self.connection.settimeout(_UNKNOWN_DRAIN_S)
            while left > 0 and time.monotonic() < deadline:
                if not (chunk := self.rfile.read1(min(left, 1 << 16))):
                    break
                left -= len(chunk)

    def _guarded(self, handle: Callable[[], None]) -> None:
        self._answered = False
        try:
            handle()
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        except Exception as err:
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
        given = header[7:].encode() if header.startswith("Bearer ") else b""
        return hmac.compare_digest(given, self.options.token.encode())  # constant time: no guessing by timing

    def do_GET(self) -> None:
        self._guarded(self._get)

    def _get(self) -> None:
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"})
        elif self.path.rstrip("/") == "/health":
            self._send(HTTPStatus.OK, {**self.info, "status": "ok", "reward_calls": self.batcher.calls})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no GET {self.path}; try /health"})

    def _body_length(self) -> int | None:
        """The length of an acceptable /score body, or None after answering why it is refused.
        Nothing of the body is read before its length is known and within the limits."""
        if not self._authorized():
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"}, close=True)
            return None
        if self.path.rstrip("/") != "/score":
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no POST {self.path}; try /score"}, close=True)
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
        return length

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _post(self) -> None:
        length = self._body_length()
        if length is None:
            return
        if not self.bodies.acquire(length, 0):
            self._busy("request bodies in memory are at max_pending_mb", close=True)
            return
        try:
            opened = open_score_request(
                self.rfile.read(length), self.options.max_pixels, self.options.max_request_pixels
            )
            if not self.batcher.pixels.acquire(opened.pixels, _QUEUE_WAIT_S):
                self._busy("the decoded images waiting to be scored are at max_queue_pixels")
                return
            try:
                images = decode_opened(opened.images)
            except BaseException:
                self.batcher.pixels.release(opened.pixels)
                raise
        except RequestError as err:
            self._send(err.status, {"error": str(err)})
            return
        finally:
            self.bodies.release(length)
        opened.images = []  # only the decoded pixels stay in memory while the request waits
        try:
            self._score(images, opened.prompts)
        finally:
            del images  # freed before its pixels are handed to the next request
            self.batcher.pixels.release(opened.pixels)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> None:
        try:
            scores = self.batcher.score(images, prompts)
        except Exception as err:
            self.log_error("reward failed: %s: %s", type(err).__name__, err)
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"the reward raised {type(err).__name__}: {err}"}
            )
            return
        self._send(HTTPStatus.OK, score_answer(scores))

    def _busy(self, why: str, close: bool = False) -> None:
        # 503: the client retries later (rlcm_exp.rewards.remote retries 503 with backoff)
        self._send(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"server busy: {why}; retry later"}, close=close)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        sys.stderr.write(f"[reward_server] {self.address_string()} {format % args}\n")


def _content_length(values: list[str]) -> int | None:
    """The one Content-Length of a request, or None when it is not one non-negative integer (-1,
    "+5", "1_0", two different values: reading such a body would be unbounded or ambiguous)."""
    if len(set(values)) != 1 or not values[0].strip().isdigit() or not values[0].strip().isascii():
        return None
    return int(values[0].strip())


def make_handler(
    batcher: Batcher, options: ServerOptions, info: dict[str, Any]
) -> type[BaseHTTPRequestHandler]:
    """A RewardHandler subclass bound to this server's batcher, options, body budget and /health info."""
    bodies = Budget(options.max_pending_bytes)
    attrs = {"batcher": batcher, "options": options, "info": info, "bodies": bodies}
    return type("Handler", (RewardHandler,), attrs)


def check_exposure(options: ServerOptions) -> None:
    """ConfigError when the server would be reachable from the network without a token, unless
    allow_insecure: anyone who reaches the port could use the reward (and its GPU)."""
    if options.token is not None or options.allow_insecure or is_loopback(options.host):
        return
    raise ConfigError(
        f"reward_server host={options.host}: refusing to serve a non-loopback address without a token "
        f"(anyone who reaches the port could use the reward). Set the token in ${options.token_env or DEFAULT_TOKEN_ENV} "
        "or token_file=PATH, use host=127.0.0.1, or pass allow_insecure=true to serve it openly."
    )


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stalled client's thread never keeps the process alive
    request_queue_size = 128  # listen backlog (the stdlib's 5 resets a burst of concurrent clients)


def bind(options: ServerOptions) -> ThreadingHTTPServer:
    """A server bound to host:port but not listening yet (connections are refused until `serve` is
    done), so a port in use is reported before any model loads; ConfigError naming host or port."""
    server = _Server((options.host, options.port), BaseHTTPRequestHandler, bind_and_activate=False)
    try:
        server.server_bind()
    except OSError as err:
        server.server_close()
        raise _bind_error(options, err) from err
    return server


def _bind_error(options: ServerOptions, err: OSError) -> ConfigError:
    if err.errno == errno.EADDRINUSE:
        return ConfigError(
            f"reward_server port={options.port}: already in use on {options.host} (another reward server?). "
            "Pick another port=N, or port=0 for a free one."
        )
    if err.errno == errno.EACCES:
        return ConfigError(
            f"reward_server port={options.port}: not allowed ({err.strerror}); use a port >= 1024."
        )
    return ConfigError(
        f"reward_server host={options.host} port={options.port}: cannot bind "
        f"({err.strerror or err}); use an address of this machine, e.g. host=127.0.0.1."
    )


def serve(
    reward: RewardFn,
    options: ServerOptions,
    name: str,
    target: str,
    server: ThreadingHTTPServer | None = None,
) -> ThreadingHTTPServer:
    """Start listening (binding first unless `server` is bound already) and return the server; call
    serve_forever to answer requests."""
    batcher = Batcher(reward, options.max_batch, options.max_wait_ms, options.max_queue_pixels)
    models = getattr(reward, "models", None)
    info = {
        "reward": name,
        "target": target,
        "models": dict(models) if isinstance(models, Mapping) else {},
        "device": options.device,
        "max_batch": options.max_batch,
        "max_request_mb": options.max_request_mb,
        "max_pixels": options.max_pixels,
        "max_request_pixels": options.max_request_pixels,
        "token_required": options.token is not None,
    }
    server = server if server is not None else bind(options)
    server.RequestHandlerClass = make_handler(batcher, options, info)
    return_freed_memory_to_os()
    try:
        server.server_activate()
    except OSError as err:
        server.server_close()
        raise _bind_error(options, err) from err
    return server


def return_freed_memory_to_os() -> None:
    """Make glibc hand every freed buffer of 1 MiB or more (a request's images) back to the OS.

    By default glibc raises its mmap threshold after such frees and then keeps later buffers in
    per-thread heaps, where they stay resident after being freed: with many request threads the
    process grows far past what max_queue_pixels bounds. A fixed threshold keeps the resident
    memory close to what requests hold. No-op where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # glibc's mallopt parameter number
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, 1 << 20)


@dataclass
class StartedServer:
    server: ThreadingHTTPServer  # listening, not yet serving
    name: str  # the reward config's name (reward=NAME)
    target: str  # its _target_
    url: str


def start(options: ServerOptions, overrides: list[str]) -> StartedServer:
    """Check the options, compose the reward config, bind the port, build the reward with
    `build_reward` (the trainer's builder, so a plain reward function can be served too) and start
    listening; ConfigError on bad input, before any model loads where it can be known then."""
    options.check()
    check_exposure(options)
    if options.device is None:
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    reward_cfg = compose_reward_config(overrides, options.config_dir)
    name = next(o for o in overrides if o.startswith("+reward=")).split("=", 1)[1]
    bound = bind(options)
    try:
        reward = build_reward(reward_cfg, options.device)
        target = str(reward_cfg._target_)
        server = serve(reward, options, name, target, bound)
    except BaseException:
        bound.server_close()
        raise
    return StartedServer(server, name, target, f"http://{options.host}:{server.server_port}")

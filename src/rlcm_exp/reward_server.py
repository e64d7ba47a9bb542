"""Serve any configured reward over HTTP, so a heavy scorer can live on its own GPU or machine.

    python -m rlcm_exp.reward_server reward=llava_bertscore port=8060
    python -m rlcm_exp.reward_server reward=aesthetic host=0.0.0.0 port=8061 token=$SECRET device=cuda:1 \
        max_batch=64 reward.dtype=float16

Server keys: host (127.0.0.1: this machine only), port (0 picks a free one), token (or
$RLCM_REWARD_TOKEN; required as `Authorization: Bearer <token>` when set), max_request_mb,
max_pixels (per image), max_batch (images per reward call), max_wait_ms (how long the batcher
waits for more requests to merge), device (default: cuda if available), config_dir. Everything
else is a Hydra override of the reward group in conf/reward/ (`reward=NAME`, `reward.x=y`).

The protocol is JSON; see rlcm_exp/rewards/remote.py (the client, `reward=remote`). Images arrive
as base64 PNG or JPEG and are decoded by PIL under a pixel limit; nothing is ever unpickled.
Concurrent requests are queued and merged into batches of up to max_batch images, so several
trainer processes share one model efficiently.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import inspect
import io
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlcm_exp.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_DRAIN_LIMIT = 1 << 30  # bytes of a refused request still read (and dropped) before closing


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 exposes the server to the network (use a token)
    port: int = 8060  # TCP port; 0 lets the OS pick a free one (printed at start)
    token: str | None = None  # shared secret; None = no authentication
    max_request_mb: float = 64.0  # largest accepted request body, MB (2**20 bytes)
    max_pixels: int = 4096 * 4096  # largest accepted image, pixels (decompression-bomb guard)
    max_batch: int = 32  # most images per reward call when merging requests
    max_wait_ms: float = 10.0  # how long the batcher waits for more requests before scoring, ms
    device: str | None = None  # passed to rewards whose builder takes `device`; None = cuda if available
    config_dir: str = str(CONFIG_DIR)  # Hydra config root holding reward/

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


_CASTS: dict[str, Callable[[str], Any]] = {
    "host": str,
    "port": int,
    "token": str,
    "max_request_mb": float,
    "max_pixels": int,
    "max_batch": int,
    "max_wait_ms": float,
    "device": str,
    "config_dir": str,
}


def parse_args(argv: list[str]) -> tuple[ServerOptions, list[str]]:
    """Split `key=value` arguments into server options and Hydra overrides of the reward group."""
    options = ServerOptions(token=os.environ.get("RLCM_REWARD_TOKEN") or None)
    overrides: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key in _CASTS and sep:
            try:
                setattr(options, key, _CASTS[key](value))
            except ValueError as err:
                raise ConfigError(f"reward_server {key}={value}: not a valid {_CASTS[key].__name__}") from err
        elif key == "reward" and sep:
            # the primary config is empty, so the reward group is added rather than overridden
            overrides.append(f"+reward={value}")
        elif key.lstrip("+~").startswith("reward."):
            overrides.append(arg)
        else:
            raise ConfigError(
                f"reward_server: unknown argument {arg!r}. Use reward=NAME (a file in conf/reward/), "
                f"reward.<key>=<value> overrides, and server keys {', '.join(f'{k}=...' for k in _CASTS)}."
            )
    if not any(o.startswith("+reward=") for o in overrides):
        raise ConfigError(
            "reward_server needs reward=NAME, e.g. reward=llava_bertscore (a file in conf/reward/)."
        )
    if options.max_batch < 1 or options.max_request_mb <= 0 or options.max_pixels < 1:
        raise ConfigError("reward_server: max_batch, max_request_mb and max_pixels must be positive.")
    return options, overrides


def compose_reward_config(overrides: list[str], config_dir: str | Path = CONFIG_DIR) -> Any:
    """The `reward` node composed from conf/reward/ with the given Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    folder = Path(config_dir).resolve()
    if not (folder / "reward").is_dir():
        raise ConfigError(
            f"reward_server config_dir={folder}: no reward/ config group there. Run from a source checkout "
            "(conf/ next to src/) or pass config_dir=/path/to/conf."
        )
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3", job_name="reward_server"):
            cfg = compose(config_name=None, overrides=overrides)
    except HydraException as err:
        names = sorted(p.stem for p in (folder / "reward").glob("*.yaml"))
        raise ConfigError(f"reward_server: {err}. Available rewards: {', '.join(names)}.") from err
    OmegaConf.resolve(cfg)
    return cfg.reward


def accepts_device(target: str) -> bool:
    """Whether the builder named by a `_target_` has a `device` parameter (the trainer's rule, too)."""
    from hydra.utils import get_method

    return "device" in inspect.signature(get_method(target)).parameters


def config_error_in(err: BaseException) -> ConfigError | None:
    """The ConfigError behind an exception, if any: Hydra wraps builder errors in InstantiationException."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConfigError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def build_reward(reward_cfg: Any, device: str) -> Callable[..., Any]:
    """instantiate(reward_cfg), passing `device` to builders that take one unless the config sets it (the trainer's rule)."""
    from hydra.utils import instantiate

    takes = "device" not in reward_cfg and accepts_device(str(reward_cfg._target_))
    kwargs = {"device": device} if takes else {}
    try:
        reward = instantiate(reward_cfg, **kwargs)
    except Exception as err:
        # a user's mistake should read as one paragraph naming the key, not as a Hydra traceback
        if (config_error := config_error_in(err)) is not None:
            raise config_error from err
        raise
    if not callable(reward):
        raise ConfigError(
            f"reward._target_={reward_cfg._target_} built a {type(reward).__name__}, not a callable"
        )
    return reward


# ----------------------------------------------------------------------------- batching


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None


def _as_dict(value: Any, n: int) -> dict[str, torch.Tensor]:
    """Either form of the reward contract -> {"reward": (n,), <component>: (n,)} float32 CPU."""
    out = dict(value) if isinstance(value, Mapping) else {"reward": value}
    if "reward" not in out:
        raise ValueError(f"the reward returned a dict without a 'reward' key (keys {sorted(out)})")
    tensors = {str(k): torch.as_tensor(v).detach().float().cpu().reshape(-1) for k, v in out.items()}
    for k, v in tensors.items():
        if v.shape != (n,):
            raise ValueError(f"the reward returned {v.numel()} values for {k!r} on a batch of {n} images")
    return tensors


class Batcher:
    """One worker thread runs the reward; request threads queue jobs and wait on them.

    The worker takes the oldest job, then keeps taking queued jobs of the same image size while
    the merged batch stays within max_batch and max_wait_ms has not passed; a job that does not
    fit waits for the next round. One reward call at a time also bounds accelerator memory.
    """

    def __init__(self, reward: Callable[..., Any], max_batch: int, max_wait_ms: float) -> None:
        self.reward = reward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.calls = 0  # reward calls so far (for /health and tests of merging)
        self._held: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        job = _Job(images, prompts)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return (
                self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()
            )
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            assert first is not None
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                job = self._next(deadline - time.monotonic())
                if job is None:
                    break
                if (
                    job.images.shape[-2:] != first.images.shape[-2:]
                    or count + len(job.images) > self.max_batch
                ):
                    self._held = job  # scored first in the next round
                    break
                batch.append(job)
                count += len(job.images)
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        try:
            images = torch.cat([j.images for j in batch])
            prompts = [p for j in batch for p in j.prompts]
            parts = []
            for i in range(0, len(images), self.max_batch):  # a single job may exceed max_batch
                self.calls += 1
                chunk = images[i : i + self.max_batch]
                parts.append(_as_dict(self.reward(chunk, prompts[i : i + self.max_batch]), len(chunk)))
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            start = 0
            for job in batch:
                n = len(job.images)
                job.result = {k: v[start : start + n] for k, v in merged.items()}
                start += n
        except BaseException as err:  # handed to every waiting request, which answers 500
            for job in batch:
                job.error = err
        finally:
            for job in batch:
                job.done.set()


# ----------------------------------------------------------------------------- HTTP


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def decode_images(items: Any, max_pixels: int) -> torch.Tensor:
    """A JSON list of base64 PNG/JPEG strings -> (B, 3, H, W) float32 in [0, 1]; all images one size."""
    if not isinstance(items, list) or not items or not all(isinstance(s, str) for s in items):
        raise RequestError(HTTPStatus.BAD_REQUEST, "'images' must be a non-empty list of base64 strings")
    arrays = []
    for i, text in enumerate(items):
        try:
            raw = base64.b64decode(text, validate=True)
            # formats=: PIL tries no other decoder, so only PNG and JPEG parsers ever see client bytes
            image = Image.open(io.BytesIO(raw), formats=["PNG", "JPEG"])
        except (binascii.Error, ValueError, OSError) as err:
            raise RequestError(
                HTTPStatus.BAD_REQUEST, f"image {i} is not a base64 PNG or JPEG: {err}"
            ) from err
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > max_pixels:
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"image {i} has {width}x{height} pixels, over max_pixels={max_pixels}",
            )
        try:
            arrays.append(np.asarray(image.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"image {i} could not be decoded: {err}") from err
        if arrays[-1].shape != arrays[0].shape:
            raise RequestError(
                HTTPStatus.BAD_REQUEST,
                f"image {i} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} but image 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; one request holds images of one size",
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _json_numbers(t: torch.Tensor) -> list[float | None]:
    # JSON has no NaN/inf: non-finite scores travel as null and the client turns them back into NaN
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


def make_handler(
    batcher: Batcher, options: ServerOptions, info: dict[str, Any]
) -> type[BaseHTTPRequestHandler]:
    token = options.token.encode() if options.token else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "rlcm-reward-server/1"
        protocol_version = "HTTP/1.1"
        timeout = 120  # seconds a client may take to send its request; a stalled one frees its thread

        def _send(self, status: HTTPStatus, payload: dict[str, Any], close: bool = False) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == HTTPStatus.UNAUTHORIZED:
                self.send_header("WWW-Authenticate", 'Bearer realm="reward"')
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
            instead of a clear 413/401.
            """
            try:
                left = min(int(self.headers.get("Content-Length", "0")), _DRAIN_LIMIT)
            except ValueError:
                return
            with contextlib.suppress(OSError):
                while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                    left -= len(chunk)

        def _authorized(self) -> bool:
            if token is None:
                return True
            header = self.headers.get("Authorization", "")
            given = header[7:].encode() if header.startswith("Bearer ") else b""
            return hmac.compare_digest(given, token)  # constant time: no token guessing by timing

        def do_GET(self) -> None:
            if not self._authorized():
                self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"})
            elif self.path.rstrip("/") == "/health":
                self._send(HTTPStatus.OK, {**info, "status": "ok", "reward_calls": batcher.calls})
            else:
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no GET {self.path}; try /health"})

        def do_POST(self) -> None:
            if not self._authorized():
                self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong token"}, close=True)
                return
            if self.path.rstrip("/") != "/score":
                self._send(HTTPStatus.NOT_FOUND, {"error": f"no POST {self.path}; try /score"}, close=True)
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"}, close=True)
                return
            if length > options.max_request_bytes:
                self._send(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"request of {length} bytes is over max_request_mb={options.max_request_mb}"},
                    close=True,
                )
                return
            try:
                request = json.loads(self.rfile.read(length))
                if not isinstance(request, dict):
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
                prompts = request.get("prompts")
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise RequestError(HTTPStatus.BAD_REQUEST, "'prompts' must be a list of strings")
                images = decode_images(request.get("images"), options.max_pixels)
                if len(prompts) != len(images):
                    raise RequestError(
                        HTTPStatus.BAD_REQUEST, f"{len(images)} images but {len(prompts)} prompts"
                    )
            except RequestError as err:
                self._send(err.status, {"error": str(err)})
                return
            except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
                self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {err}"})
                return
            try:
                scores = batcher.score(images, prompts)
            except Exception as err:
                self.log_error("reward failed: %s: %s", type(err).__name__, err)
                self._send(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    {"error": f"the reward raised {type(err).__name__}: {err}"},
                )
                return
            payload: dict[str, Any] = {"rewards": _json_numbers(scores["reward"])}
            components = {k: _json_numbers(v) for k, v in scores.items() if k != "reward"}
            if components:
                payload["components"] = components
            self._send(HTTPStatus.OK, payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
            sys.stderr.write(f"[reward_server] {self.address_string()} {format % args}\n")

    return Handler


def serve(reward: Callable[..., Any], options: ServerOptions, name: str, target: str) -> ThreadingHTTPServer:
    """Bind and return the server (not yet serving: call serve_forever)."""
    batcher = Batcher(reward, options.max_batch, options.max_wait_ms)
    models = getattr(reward, "models", None)
    info = {
        "reward": name,
        "target": target,
        "models": dict(models) if isinstance(models, Mapping) else {},
        "device": options.device,
        "max_batch": options.max_batch,
        "max_request_mb": options.max_request_mb,
        "max_pixels": options.max_pixels,
        "token_required": options.token is not None,
    }
    server = ThreadingHTTPServer((options.host, options.port), make_handler(batcher, options, info))
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    try:
        options, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        if options.device is None:
            options.device = "cuda" if torch.cuda.is_available() else "cpu"
        reward_cfg = compose_reward_config(overrides, options.config_dir)
        name = next(o for o in overrides if o.startswith("+reward=")).split("=", 1)[1]
        reward = build_reward(reward_cfg, options.device)
        server = serve(reward, options, name, str(reward_cfg._target_))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if options.host not in _LOOPBACK and options.token is None:
        print(
            f"warning: listening on {options.host} without a token: anyone who can reach this port can use "
            "the reward (and its GPU). Set token=... or $RLCM_REWARD_TOKEN.",
            file=sys.stderr,
        )
    url = f"http://{options.host}:{server.server_port}"
    print(f"reward server: {name} ({reward_cfg._target_}) listening on {url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

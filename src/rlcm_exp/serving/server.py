"""The reward server: composing the reward configs, binding, and `start`.

The protocol is JSON; see rlcm_exp/rewards/remote.py (the client, `reward=remote`). Images arrive
as base64 PNG or JPEG and are decoded by PIL under a pixel limit; nothing is ever unpickled.
Concurrent requests are queued and merged into batches of up to max_batch images (batcher.py),
so several trainer processes share one model efficiently; one server may serve several rewards,
each with its own batcher (POST /score/<name>). The HTTP handler is handler.py, connection limits
and deadlines connections.py, the settings options.py.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlcm_exp.configs import conf_dir
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import RewardFn, build_reward
from rlcm_exp.secrets import DEFAULT_TOKEN_ENV
from rlcm_exp.serving.batcher import Batcher, Budget
from rlcm_exp.serving.connections import CappedServer
from rlcm_exp.serving.handler import ServedReward, make_handler
from rlcm_exp.serving.options import ServerOptions
from rlcm_exp.serving.requests import (  # noqa: F401 (re-exported: the request parsing's old home)
    RequestError,
    decode_images,
    open_images,
    open_score_request,
    parse_score_request,
)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
BYTES_PER_PIXEL = 16  # memory of one reserved pixel: float32 RGB (12) + its uint8 decode (3), rounded up
BYTES_PER_BODY_BYTE = 3  # memory of one body byte until decoded: the body, its JSON strings, base64-decoded


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


def bind(options: ServerOptions) -> CappedServer:
    """A server bound to host:port but not listening yet (connections are refused until `serve` is
    done), so a port in use is reported before any model loads; ConfigError naming host or port."""
    server = CappedServer(
        (options.host, options.port), make_handler({}, options, {}), bind_and_activate=False
    )
    server.max_connections = options.max_connections
    _bind_step(server, options, server.server_bind)
    return server


def _bind_step(server: CappedServer, options: ServerOptions, step: Callable[[], None]) -> None:
    """Run `server_bind` or `server_activate`; on failure close the socket and raise a ConfigError."""
    try:
        step()
    except OSError as err:
        server.server_close()
        raise _bind_error(options, err) from err


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


@dataclass
class LoadedReward:
    reward: RewardFn  # the built reward
    target: str  # its config's _target_


def serve(
    rewards: Mapping[str, LoadedReward], options: ServerOptions, server: CappedServer | None = None
) -> CappedServer:
    """Start listening (binding first unless `server` is bound already) and return the server; call
    serve_forever to answer requests. Each reward gets its own batcher (worker thread, timeout);
    they share one pixel budget (max_queue_pixels) and one body budget (max_pending_mb)."""
    if not rewards:
        raise ConfigError("reward_server: no reward to serve; pass reward=NAME or rewards=[NAME,...].")
    pixels = Budget(options.max_queue_pixels)
    served = {
        name: ServedReward(
            Batcher(
                loaded.reward, options.max_batch, options.max_wait_ms, None, options.reward_timeout_s, pixels
            ),
            loaded.target,
            _models(loaded.reward),
        )
        for name, loaded in rewards.items()
    }
    first = next(iter(served))
    info = {
        "reward": first,
        "target": served[first].target,
        "models": served[first].models,
        "device": options.device,
        "max_batch": options.max_batch,
        "max_request_mb": options.max_request_mb,
        "max_pixels": options.max_pixels,
        "max_request_pixels": options.max_request_pixels,
        "max_connections": options.max_connections,
        "request_timeout_s": options.request_timeout_s,
        "min_upload_kb_s": options.min_upload_kb_s,
        "reward_timeout_s": options.reward_timeout_s,
        "token_required": options.token is not None,
    }
    server = server if server is not None else bind(options)
    server.max_connections = options.max_connections
    server.RequestHandlerClass = make_handler(served, options, info)
    return_freed_memory_to_os()
    _bind_step(server, options, server.server_activate)
    return server


def _models(reward: RewardFn) -> dict[str, str]:
    models = getattr(reward, "models", None)
    return {str(k): str(v) for k, v in models.items()} if isinstance(models, Mapping) else {}


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
    server: CappedServer  # listening, not yet serving
    names: list[str]  # the served rewards' names (the first is the default)
    targets: list[str]  # their _target_s
    url: str

    @property
    def name(self) -> str:
        return ", ".join(self.names)

    @property
    def target(self) -> str:
        return ", ".join(self.targets)


def start(options: ServerOptions, rewards: Mapping[str, list[str]]) -> StartedServer:
    """Check the options, compose each reward's config (name -> its Hydra overrides, `+reward=CONFIG`
    first), bind the port, build the rewards with `build_reward` (the trainer's builder, so a plain
    reward function can be served too) and start listening; ConfigError on bad input, before any
    model loads where it can be known then."""
    options.check()
    options.check_token()
    check_exposure(options)
    options.ensure_file_limit()
    if options.device is None:
        options.device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = {
        name: compose_reward_config(overrides, options.config_dir) for name, overrides in rewards.items()
    }
    bound = bind(options)
    try:
        loaded = {
            name: LoadedReward(build_reward(cfg, options.device), str(cfg._target_))
            for name, cfg in configs.items()
        }
        server = serve(loaded, options, bound)
    except BaseException:
        bound.server_close()
        raise
    targets = [item.target for item in loaded.values()]
    return StartedServer(server, list(loaded), targets, f"http://{options.host}:{server.server_port}")

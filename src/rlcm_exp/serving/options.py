"""The reward server's settings: every one typed, with its unit and range, checked before the server
starts (a bad value is a one-line ConfigError naming the option)."""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, fields

from rlcm_exp.errors import ConfigError
from rlcm_exp.secrets import DEFAULT_TOKEN_ENV, check_header_token

# File descriptors kept free besides one per connection: the listening socket, models, logs, pipes.
FD_RESERVE = 64
_BIG = 2**40  # upper bound of the integer limits (no real setting comes near it)
_MAX_S = 7 * 24 * 3600.0  # upper bound of every duration: one week


@dataclass(frozen=True)
class _Range:
    low: float  # smallest valid value
    high: float  # largest valid value
    low_open: bool = False  # True: `low` itself is not valid (a positive number)


# option -> its valid range (closed unless low_open); every number is also finite
RANGES: dict[str, _Range] = {
    "port": _Range(0, 65535),
    "max_request_mb": _Range(0, 1 << 20, low_open=True),
    "max_pending_mb": _Range(0, 1 << 20, low_open=True),
    "max_pixels": _Range(1, _BIG),
    "max_request_pixels": _Range(1, _BIG),
    "max_queue_pixels": _Range(1, _BIG),
    "max_batch": _Range(1, 1 << 20),
    "max_wait_ms": _Range(0, 60_000),
    "max_connections": _Range(1, 1 << 20),
    "request_timeout_s": _Range(0, _MAX_S, low_open=True),
    "min_upload_kb_s": _Range(0, 1 << 30, low_open=True),
    "reward_timeout_s": _Range(0, _MAX_S, low_open=True),
}


@dataclass
class ServerOptions:
    """The server keys of `python -m rlcm_exp.reward_server` (see its usage text), with defaults.
    All of them are per server process (shared by every reward it serves).

    Memory: requests never hold more than about BYTES_PER_BODY_BYTE * max_pending_mb (bodies read,
    not yet decoded) + BYTES_PER_PIXEL * max_queue_pixels (decoded images queued or being scored);
    with the defaults, 768 MB + 1 GiB, besides the rewards' own models and activations.
    """

    host: str = "127.0.0.1"  # bind address; another than loopback needs a token (or allow_insecure)
    port: int = 8060  # TCP port; 0 lets the OS pick a free one (printed at start)
    token: str | None = None  # the shared secret itself (shows in `ps`: prefer token_env or token_file)
    token_env: str | None = DEFAULT_TOKEN_ENV  # environment variable holding the token
    token_file: str | None = None  # file holding the token (first line)
    allow_insecure: bool = False  # serve a non-loopback host without a token (anyone may use the reward)
    max_request_mb: float = 64.0  # largest accepted request body, MB (2**20 bytes)
    max_pending_mb: float = 256.0  # request bodies received but not yet decoded, all requests together, MB
    max_pixels: int = 4096 * 4096  # largest accepted image, pixels (decompression-bomb guard)
    max_request_pixels: int = 4096 * 4096  # decoded pixels of one request (64 images of 512x512)
    max_queue_pixels: int = 4 * 4096 * 4096  # decoded pixels of all requests waiting or being scored
    max_batch: int = 32  # most images per reward call when merging requests (per reward)
    max_wait_ms: float = 10.0  # how long a reward's batcher waits for more requests before scoring, ms
    max_connections: int = 256  # connections open at once (one thread each); more get 503 and are closed
    # seconds for a request's line and headers to arrive, counted from the connection's accept (or
    # its previous answer): an idle or trickling connection is closed after this long
    request_timeout_s: float = 30.0
    # slowest accepted upload, KB/s (1024 bytes): the first n body bytes must have arrived within
    # request_timeout_s + n / rate of the request's start, so a trickling body is dropped (408)
    min_upload_kb_s: float = 256.0
    # longest one reward call may run, seconds: past it the waiting requests are answered with
    # their unscored images marked "timeout", and /health reports that reward "stuck"
    reward_timeout_s: float = 120.0
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

    @property
    def min_upload_bytes_s(self) -> float:
        return self.min_upload_kb_s * 1024

    def check(self) -> None:
        """ConfigError naming the key when a setting has the wrong type or is out of range."""
        types = {f.name: f.type for f in fields(self)}
        for key, valid in RANGES.items():
            value = getattr(self, key)
            integer = types[key] in ("int", int)
            kind = "an integer" if integer else "a number"
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                raise ConfigError(f"reward_server {key}={value!r}: must be {kind}.")
            too_low = value <= valid.low if valid.low_open else value < valid.low
            if not math.isfinite(value) or too_low or value > valid.high:
                low = f"> {valid.low:g}" if valid.low_open else f">= {valid.low:g}"
                raise ConfigError(f"reward_server {key}={value}: must be {kind} {low} and <= {valid.high:g}.")
        if self.max_queue_pixels < self.max_request_pixels or self.max_pending_mb < self.max_request_mb:
            raise ConfigError(
                f"reward_server max_queue_pixels={self.max_queue_pixels} must be >= max_request_pixels="
                f"{self.max_request_pixels}, and max_pending_mb={self.max_pending_mb} >= max_request_mb="
                f"{self.max_request_mb}: otherwise a request within the limits could never be served."
            )

    def check_token(self) -> None:
        """ConfigError when a token is set but empty, or not sendable in an HTTP header (Latin-1,
        no spaces or control characters)."""
        if self.token is not None:
            check_header_token(self.token, "reward_server token")

    def ensure_file_limit(self) -> None:
        """Raise this process's open-file limit to fit max_connections (up to the hard limit), or a
        ConfigError naming max_connections: past the limit, accept() fails and clients are locked out."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = self.max_connections + FD_RESERVE
        if soft != resource.RLIM_INFINITY and soft < need:
            if hard != resource.RLIM_INFINITY and hard < need:
                raise ConfigError(
                    f"reward_server max_connections={self.max_connections}: needs {need} open files, but "
                    f"the limit is {hard} (ulimit -Hn); use max_connections<={hard - FD_RESERVE}."
                )
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

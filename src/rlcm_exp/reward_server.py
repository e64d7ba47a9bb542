"""Serve any configured reward over HTTP, so a heavy scorer can live on its own GPU or machine.

usage: python -m rlcm_exp.reward_server reward=NAME [reward.KEY=VALUE ...] [SERVER_KEY=VALUE ...]
       python -m rlcm_exp.reward_server rewards=[NAME,...] [rewards.NAME.KEY=VALUE ...] [SERVER_KEY=VALUE ...]

    python -m rlcm_exp.reward_server reward=llava_bertscore port=8060
    python -m rlcm_exp.reward_server 'rewards=[ocr,jpeg_compressibility]' rewards.ocr.num_threads=4
    python -m rlcm_exp.reward_server 'rewards={text:ocr,judge:vlm_judge}' rewards.judge.mode=rubric
    RLCM_REWARD_TOKEN=... python -m rlcm_exp.reward_server reward=aesthetic host=0.0.0.0 port=8061 \\
        device=cuda:1 max_batch=64 reward.dtype=float16
    python -m rlcm_exp.reward_server reward=aesthetic host=0.0.0.0 token_file=~/.rlcm_token
    python -m rlcm_exp.reward_server reward=custom reward._target_=my_module.my_reward port=8062

Server keys:
  host              bind address (127.0.0.1: this machine only). Another address needs a token,
                    or allow_insecure=true to serve it to anyone who can reach the port
  port              TCP port (0 picks a free one); one in use is an error (exit code 2)
  token_env         environment variable holding the token (default RLCM_REWARD_TOKEN); with a
                    token set, every request needs `Authorization: Bearer <token>`
  token_file        file holding the token on its first line (chmod 600), read at start
  token             the token itself: works, but shows in `ps` and shell history (warned about)
  allow_insecure    true: serve a non-loopback host without a token
  max_request_mb    largest request body, MB (64)
  max_pending_mb    request bodies read but not yet decoded, all requests together, MB (256)
  max_pixels        largest image, pixels (4096*4096)
  max_request_pixels  decoded pixels of one request (4096*4096, i.e. 64 images of 512x512)
  max_queue_pixels  decoded pixels of all requests waiting or being scored (4*4096*4096)
  max_batch         images per reward call (32); max_wait_ms: how long the batcher waits for
                    more requests to merge (10)
  max_connections   connections open at once, one thread each (256); more are answered 503 and
                    closed at once (no thread). Needs max_connections + 64 open files (raised to
                    the hard limit if needed; above it, an error)
  request_timeout_s seconds for a request's line and headers to arrive, counted from the accept or
                    the previous answer (30): idle and trickling connections are closed
  min_upload_kb_s   slowest accepted body upload, KB/s (256): the first n body bytes must arrive
                    within request_timeout_s + n / rate of the request's start, else 408 and closed
  reward_timeout_s  longest one reward call may run, seconds (120): past it the waiting requests
                    are answered with their unscored images marked "timeout", the reward is
                    "stuck" on /health, and requests for it are answered at once (marked "stuck")
                    until the call returns
  device            default: cuda if available; config_dir: default the configs shipped with rlcm_exp
Requests over a limit get 413 (or 503 while the server is full; clients retry). Memory held by
requests stays under about 3 x max_pending_mb + 16 bytes x max_queue_pixels (768 MB + 1 GiB by
default), besides the rewards' own models. Every number is checked at start (finite, in range);
a token must be non-empty printable Latin-1 without spaces.

Everything else is a Hydra override of the reward group (`reward=NAME` picks conf/reward/NAME.yaml,
`reward.x=y` sets a key); a plain reward function `fn(images, prompts, **options)` is served with
reward=custom reward._target_=... With rewards=[a,b] (served as a and b) or rewards={x:a,y:b}
(config a served as x; quote both in a shell), each reward is composed on its own (`rewards.x.key=value` sets its key) and
has its own batcher and timeout; clients pick one with POST /score/<name> (reward.server_reward),
/score is the first.

The protocol is JSON; see rlcm_exp/rewards/remote.py (the client, `reward=remote`). The server
itself lives in rlcm_exp/serving/. Exit codes: 0 after Ctrl-C, 2 for bad arguments or config
(a port in use, a non-loopback host without a token).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import Any

from rlcm_exp.errors import CONFIG_ERROR_EXIT_CODE, ConfigError
from rlcm_exp.secrets import read_token, redact_output
from rlcm_exp.serving.server import ServerOptions, start


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


_CASTS: dict[str, Callable[[str], Any]] = {
    "host": str,
    "port": int,
    "token": str,
    "token_env": str,
    "token_file": str,
    "allow_insecure": _bool,
    "max_request_mb": float,
    "max_pending_mb": float,
    "max_pixels": int,
    "max_request_pixels": int,
    "max_queue_pixels": int,
    "max_batch": int,
    "max_wait_ms": float,
    "max_connections": int,
    "request_timeout_s": float,
    "min_upload_kb_s": float,
    "reward_timeout_s": float,
    "device": str,
    "config_dir": str,
}
INLINE_TOKEN_WARNING = (
    "warning: token=... on the command line is visible to every user of this machine (`ps`) and kept "
    "in shell history; put it in $RLCM_REWARD_TOKEN (or token_env=NAME) or a file (token_file=PATH)."
)


def parse_rewards(value: str) -> dict[str, str]:
    """`rewards=[a,b]` (served as a and b) or `rewards={x:a,y:b}` (config a served as x) -> name -> config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(f"rewards={value}").value()
    except HydraException as err:
        raise ConfigError(
            f"reward_server rewards={value}: not a list [a,b] or a mapping {{name:a}} ({err})"
        ) from err
    pairs = {str(v): v for v in parsed} if isinstance(parsed, list) else parsed
    if (
        not isinstance(pairs, dict)
        or not pairs
        or not isinstance(parsed, list | dict)
        or len(pairs) != len(parsed)
    ):
        raise ConfigError(
            f"reward_server rewards={value}: give a non-empty list of distinct reward configs, e.g. "
            "rewards=[ocr,jpeg_compressibility], or a mapping name->config, e.g. "
            "rewards={text:ocr,jpeg:jpeg_compressibility}."
        )
    if not all(isinstance(c, str) and _NAME.fullmatch(str(n)) for n, c in pairs.items()):
        raise ConfigError(
            f"reward_server rewards={value}: names and configs must be words like ocr or my_reward_2."
        )
    return {str(name): str(config) for name, config in pairs.items()}


_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _reward_overrides(argv: list[str]) -> dict[str, list[str]]:
    """The rewards to serve (name -> Hydra overrides, `+reward=CONFIG` first) from reward=/rewards=
    and the reward.KEY=VALUE (one reward) or rewards.NAME.KEY=VALUE (several) overrides."""
    singles = [a.split("=", 1)[1] for a in argv if a.startswith("reward=")]
    several = [a.split("=", 1)[1] for a in argv if a.startswith("rewards=")]
    if len(singles) + len(several) != 1:
        raise ConfigError(
            "reward_server needs reward=NAME (a file in conf/reward/), e.g. reward=llava_bertscore, or "
            "rewards=[NAME,...] to serve several, e.g. rewards=[ocr,jpeg_compressibility]; one of them, once."
        )
    configs = {singles[0]: singles[0]} if singles else parse_rewards(several[0])
    rewards = {name: [f"+reward={config}"] for name, config in configs.items()}
    for arg in argv:
        sign = arg[: len(arg) - len(arg.lstrip("+~"))]
        key = arg[len(sign) :]
        if singles and key.startswith("reward."):
            rewards[singles[0]].append(arg)
        elif several and key.startswith("rewards."):
            name, _, rest = key[len("rewards.") :].partition(".")
            if name not in rewards or not rest:
                raise ConfigError(
                    f"reward_server {arg}: use rewards.NAME.KEY=VALUE with NAME one of {', '.join(rewards)}."
                )
            rewards[name].append(f"{sign}reward.{rest}")
        elif key.startswith(("reward.", "rewards.")):
            raise ConfigError(
                f"reward_server {arg}: with reward=NAME override reward.KEY=VALUE; with rewards=[...] override "
                "rewards.NAME.KEY=VALUE."
            )
    return rewards


def parse_args(argv: list[str]) -> tuple[ServerOptions, dict[str, list[str]]]:
    """Split `key=value` arguments into server options (the token read from where it is kept) and
    the rewards to serve, each with its Hydra overrides of the reward group."""
    options = ServerOptions()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if key in _CASTS and sep:
            try:
                setattr(options, key, _CASTS[key](value))
            except ValueError as err:
                kind = "true/false" if _CASTS[key] is _bool else _CASTS[key].__name__
                raise ConfigError(f"reward_server {key}={value}: not a valid {kind}") from err
        elif not (sep and key.lstrip("+~").split(".")[0] in ("reward", "rewards")):
            raise ConfigError(
                f"reward_server: unknown argument {arg!r}. Use reward=NAME (a file in conf/reward/) with "
                "reward.<key>=<value> overrides, or rewards=[NAME,...] with rewards.NAME.<key>=<value>, and "
                f"server keys {', '.join(f'{k}=...' for k in _CASTS)}."
            )
    rewards = _reward_overrides(argv)
    options.check()
    if any(a.startswith("token=") for a in argv) and not options.token:
        raise ConfigError(
            "reward_server token=: empty; give a token, or leave token= out (no token on loopback)."
        )
    options.token = read_token(
        options.token, options.token_env, options.token_file, "reward_server token_file"
    )
    options.check_token()
    return options, rewards


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    redact_output(args)  # the token of the command line (or a secret-looking variable) in no message
    try:
        options, rewards = parse_args(args)
        redact_output([f"token={options.token}"] if options.token else [])  # read from a file
        if any(a.startswith("token=") for a in args):
            print(INLINE_TOKEN_WARNING, file=sys.stderr)
        started = start(options, rewards)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    print(f"reward server: {started.name} ({started.target}) listening on {started.url}", flush=True)
    try:
        started.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        started.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Secrets (reward-server tokens, API keys): where they are read from, and keeping them out of run dirs.

A secret is read from an environment variable or a file (`read_token`), so it never has to appear
on a command line (visible to every user in `ps` and kept in shell history) nor in a config. When a
user gives one inline anyway (`reward.token=...`), `redact` and `redact_run_dir` make sure that no
config written into a run dir, and nothing sent to the tracker, holds it.

A key is secret-looking when its name, lower-cased with camelCase split into words, is one of
SECRET_NAMES or ends with `_<one of them>` (`token`, `hf_token`, `wandb_api_key`, `client_secret`),
so `max_new_tokens`, `tokenizer`, `token_env` and `token_file` (a variable's name, a path) are kept.
Credentials inside a URL (`http://user:PASSWORD@host`, `?token=VALUE`) are redacted wherever a
string is: in configs, override strings and messages.

Messages are covered too: the entry points call `redact_output(argv)` first, which wraps stdout and
stderr so that every secret given on the command line (or held in a secret-looking environment
variable) is written as <redacted>, including in Hydra's own failure banners and in tracebacks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlcm_exp.errors import ConfigError

REDACTED = "<redacted>"
SECRET_NAMES = ("token", "api_key", "apikey", "password", "passwd", "secret", "secret_key", "access_key")
DEFAULT_TOKEN_ENV = "RLCM_REWARD_TOKEN"
# the three files Hydra writes into <run_dir>/.hydra: composed config, command-line overrides, Hydra's own
HYDRA_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# overrides as Hydra writes them: optional +/++/~ prefix, a dotted key, '=', the value; one per
# string (overrides.yaml), or several joined by commas (hydra.job.override_dirname), where a value
# runs up to the next `,key=`
_KEY = r"[+~]*[\w.\-/@]+"
_OVERRIDE = re.compile(rf"(?:^|(?<=,))(?P<key>{_KEY})=(?P<value>.*?)(?=,{_KEY}=|$)", re.DOTALL)
# credentials in a URL: the password of scheme://user:PASSWORD@host, and the value of a secret-looking
# query parameter (?token=VALUE, &api_key=VALUE)
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][\w+.\-]*://[^\s/:@'\"]*:)(?P<value>[^\s/@'\"]+)(?=@)")
_URL_QUERY = re.compile(r"(?P<head>[?&](?P<key>[\w\-]+)=)(?P<value>[^\s&#'\"]+)")
MIN_SECRET_LENGTH = 4  # shorter values are replaced only where their key says they are secret


def is_secret_key(key: object) -> bool:
    """True for keys such as token, api_key, apiKey, hf_token, password, client_secret."""
    if not isinstance(key, str):
        return False
    name = _CAMEL.sub("_", key.rsplit(".", 1)[-1].lstrip("+~")).lower().replace("-", "_")
    return any(name == s or name.endswith("_" + s) for s in SECRET_NAMES)


def redact(container: Any) -> Any:
    """A copy of `container` (dicts, lists, DictConfig/ListConfig, override strings) in which the value
    of every secret-looking key is "<redacted>"; null values stay null (there is nothing to hide).

    Strings inside lists that read as overrides (`reward.token=SECRET`, as in Hydra's overrides.yaml)
    are redacted too. A DictConfig is converted without resolving, so interpolations stay as written.
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(container, DictConfig | ListConfig):
            container = OmegaConf.to_container(container, resolve=False)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(container, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and v is not None else redact(v)) for k, v in container.items()
        }
    if isinstance(container, list | tuple):
        return [redact(v) for v in container]
    if isinstance(container, str):
        return redact_override(container)
    return container


def redact_override(text: str) -> str:
    """`reward.token=SECRET` -> `reward.token=<redacted>` (also inside `a=1,reward.token=SECRET,b=2`),
    and the credentials of any URL in it (`redact_url`); any other string is returned unchanged."""
    if "=" in text:
        text = _OVERRIDE.sub(_redact_match, text)
    return redact_url(text)


def redact_url(text: str) -> str:
    """`http://user:PASS@host/x?token=T` -> `http://user:<redacted>@host/x?token=<redacted>`, wherever
    URLs appear in `text`; the rest of the text is kept."""
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    if "=" in text and ("?" in text or "&" in text):
        text = _URL_QUERY.sub(lambda m: m["head"] + REDACTED if is_secret_key(m["key"]) else m[0], text)
    return text


def url_secrets(text: str) -> set[str]:
    """The credentials `redact_url` hides in `text` (URL passwords, secret query values)."""
    found = {m["value"] for m in _URL_PASSWORD.finditer(text)}
    return found | {m["value"] for m in _URL_QUERY.finditer(text) if is_secret_key(m["key"])}


def _redact_match(match: re.Match[str]) -> str:
    if is_secret_key(match["key"]) and match["value"] not in ("", "null"):
        return f"{match['key']}={REDACTED}"
    return match[0]


def secret_values(container: Any) -> set[str]:
    """Every non-empty value held under a secret-looking key (or in a secret override string)."""
    found: set[str] = set()
    if isinstance(container, Mapping):
        for k, v in container.items():
            if is_secret_key(k) and isinstance(v, str | int | float) and not isinstance(v, bool):
                found.add(str(v))
            else:
                found |= secret_values(v)
    elif isinstance(container, list | tuple):
        for v in container:
            found |= secret_values(v)
    elif isinstance(container, str):
        if "=" in container:
            found |= {m["value"] for m in _OVERRIDE.finditer(container) if is_secret_key(m["key"])}
        found |= url_secrets(container)
    return {s for s in found if s and s != "null" and s != REDACTED}


def redact_run_dir(run_dir: str | Path, extra_secrets: Iterable[str] = ()) -> list[Path]:
    """Rewrite <run_dir>/.hydra/{config,overrides,hydra}.yaml with every secret redacted; returns the
    files changed. Besides the secret keys themselves, every other occurrence of a secret's value in
    those files (Hydra copies overrides into `hydra.overrides.task` and `hydra.job.override_dirname`)
    is replaced, as is every value in `extra_secrets` (e.g. a token read from the environment)."""
    import yaml

    folder = Path(run_dir) / ".hydra"
    texts = {name: (folder / name).read_text() for name in HYDRA_FILES if (folder / name).is_file()}
    loaded = {name: yaml.safe_load(text) for name, text in texts.items()}
    values = set(extra_secrets).union(*(secret_values(v) for v in loaded.values()))
    # longest first, so a secret that contains another is replaced whole
    values = {v for v in values if len(v) >= MIN_SECRET_LENGTH}  # never rewrite every "a" or "1" of a file
    changed = []
    for name, text in texts.items():
        data = redact(loaded[name])
        out = yaml.safe_dump(data, sort_keys=False, allow_unicode=True) if data is not None else text
        for value in sorted(values, key=len, reverse=True):
            out = out.replace(value, REDACTED)
        if out != text:
            _write_private(folder / name, out)
            changed.append(folder / name)
    return changed


def environment_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-looking environment variables (RLCM_REWARD_TOKEN, HF_TOKEN, WANDB_API_KEY, ...)."""
    env = os.environ if environ is None else environ
    names = {DEFAULT_TOKEN_ENV} | {name for name in env if is_secret_key(name)}
    return {env[n] for n in names if len(env.get(n) or "") >= MIN_SECRET_LENGTH}


class RedactingStream:
    """A text stream that writes through to `stream` with every value of `secrets` and every URL
    credential replaced by <redacted>. Each write is redacted on its own: a caller that writes a
    secret in pieces is not covered (print, logging and tracebacks write whole lines)."""

    def __init__(self, stream: Any, secrets: Iterable[str]) -> None:
        self._stream = stream
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Hide these values too (longest first, so a secret containing another is replaced whole)."""
        found = set(self._secrets) | {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
        self._secrets = sorted(found, key=len, reverse=True)

    def write(self, text: str) -> int:
        for value in self._secrets:
            text = text.replace(value, REDACTED)
        return self._stream.write(redact_url(text))

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def redact_output(argv: Iterable[str]) -> set[str]:
    """Wrap sys.stdout and sys.stderr (once) so that nothing written there shows a secret given in
    `argv` (`reward.token=...`, credentials in a URL) or held in a secret-looking environment
    variable; returns those secrets. Call it first in an entry point, before Hydra sets up logging."""
    import sys

    secrets = secret_values(list(argv)) | environment_secrets()
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if isinstance(stream, RedactingStream):
            stream.add(secrets)
        else:
            setattr(sys, name, RedactingStream(stream, secrets))
    return secrets


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically, so a kill mid-write never leaves the secret or half a file behind."""
    tmp = path.with_name(path.name + ".redacting")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_header_token(token: str, what: str) -> None:
    """ConfigError naming `what` (never the token) when `token` is empty or cannot be sent in an HTTP
    `Authorization` header: Latin-1 only, no spaces or control characters."""
    if not token.strip():
        raise ConfigError(f"{what}: empty; set a non-empty token, or none on loopback.")
    bad = next((i for i, c in enumerate(token) if ord(c) > 255), None)
    if bad is not None:
        raise ConfigError(
            f"{what}: holds a character outside Latin-1 (U+{ord(token[bad]):04X} at position {bad}), which no "
            "HTTP header can carry; use ASCII letters, digits and punctuation."
        )
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"{what}: holds spaces or control characters; use printable ones.")


def read_token(inline: str | None, env: str | None, file: str | Path | None, what: str) -> str | None:
    """The token from, in this order: `inline` (works, but shows in `ps` and shell history), the file
    `file` (its first line; should be readable by you only), the environment variable named `env`.
    None when none is set. `what` names the keys in error messages, e.g. "reward.token_file"."""
    if inline:
        return inline
    if file:
        path = Path(file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as err:
            raise ConfigError(
                f"{what}={file}: cannot read the token file ({err.strerror or err}). Write the token "
                "into it (one line, `chmod 600`), or pass the token through an environment variable."
            ) from err
        token = lines[0].strip() if lines else ""
        if not token:
            raise ConfigError(f"{what}={file}: the token file is empty; write the token on its first line.")
        return token
    if env:
        return os.environ.get(env) or None
    return None

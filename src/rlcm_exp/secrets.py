"""Secrets (reward-server tokens, API keys): where they are read from, and keeping them out of run dirs.

A secret is read from an environment variable or a file (`read_token`), so it never has to appear
on a command line (visible to every user in `ps` and kept in shell history) nor in a config. When a
user gives one inline anyway (`reward.token=...`), `redact` and `redact_run_dir` make sure that no
config written into a run dir, and nothing sent to the tracker, holds it.

A key is secret-looking when its name, lower-cased with camelCase split into words, is one of
SECRET_NAMES or ends with `_<one of them>` (`token`, `hf_token`, `wandb_api_key`, `client_secret`),
so `max_new_tokens`, `tokenizer`, `token_env` and `token_file` (a variable's name, a path) are kept.
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
    """`reward.token=SECRET` -> `reward.token=<redacted>` (also inside `a=1,reward.token=SECRET,b=2`);
    any other string is returned unchanged."""
    if "=" not in text:
        return text
    return _OVERRIDE.sub(_redact_match, text)


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
    elif isinstance(container, str) and "=" in container:
        found |= {m["value"] for m in _OVERRIDE.finditer(container) if is_secret_key(m["key"])}
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
    values = {v for v in values if len(v) >= 4}  # never rewrite every "a" or "1" of a file
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


def _write_private(path: Path, text: str) -> None:
    """Replace `path` atomically, so a kill mid-write never leaves the secret or half a file behind."""
    tmp = path.with_name(path.name + ".redacting")
    tmp.write_text(text)
    os.replace(tmp, path)


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

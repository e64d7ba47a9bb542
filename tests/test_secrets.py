"""rlcm_exp.secrets: which keys are secret, `redact` of configs and overrides, `redact_run_dir` of
Hydra's saved files, `read_token` (inline, file, environment); and, end to end, that a training run
against a real reward server with `reward.token=SECRET` leaves the secret in no file of its run dir."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.secrets import REDACTED, is_secret_key, read_token, redact, redact_run_dir, secret_values

SECRET = "s3cr3t-VALUE-4242"
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "TOKEN",
        "hf_token",
        "api_key",
        "apiKey",
        "WANDB_API_KEY",
        "password",
        "client_secret",
        "Secret",
    ],
)
def test_secret_looking_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["max_new_tokens", "tokenizer", "token_env", "token_file", "keys", "url", "tokens", "secrets_dir", 3],
)
def test_ordinary_keys_are_kept(key):
    assert not is_secret_key(key)


def test_redact_nested_dicts_lists_and_override_strings():
    cfg = {
        "reward": {
            "_target_": "rlcm_exp.rewards.remote.remote",
            "token": SECRET,
            "token_env": "RLCM_REWARD_TOKEN",
            "max_new_tokens": 6,
            "components": [{"Api_Key": SECRET, "weight": 1.0}, {"password": None}],
        },
        "logger": {"tags": ["a", "reward.token=" + SECRET]},
        "seed": 42,
    }
    out = redact(cfg)
    assert out["reward"]["token"] == REDACTED and out["reward"]["components"][0]["Api_Key"] == REDACTED
    assert out["reward"]["token_env"] == "RLCM_REWARD_TOKEN" and out["reward"]["max_new_tokens"] == 6
    assert out["reward"]["components"][1]["password"] is None  # nothing to hide
    assert out["logger"]["tags"] == ["a", f"reward.token={REDACTED}"] and out["seed"] == 42
    assert SECRET not in repr(out)
    assert cfg["reward"]["token"] == SECRET  # the input is left as it was
    assert secret_values(cfg) == {SECRET}


def test_redact_a_dictconfig_keeps_interpolations_unresolved():
    cfg = OmegaConf.create({"reward": {"token": SECRET, "url": "${host}"}, "host": "http://x"})
    assert redact(cfg) == {"reward": {"token": REDACTED, "url": "${host}"}, "host": "http://x"}


def test_redact_overrides_as_hydra_writes_them():
    overrides = [f"reward.token={SECRET}", f"+reward.api_key={SECRET}", "train.epochs=1", "~reward.password"]
    out = redact(overrides)
    assert out == [
        f"reward.token={REDACTED}",
        f"+reward.api_key={REDACTED}",
        "train.epochs=1",
        "~reward.password",
    ]


def test_redact_run_dir_rewrites_hydra_files(tmp_path):
    hydra_dir = tmp_path / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "config.yaml").write_text(
        yaml.safe_dump({"reward": {"token": SECRET, "url": "u"}, "seed": 1})
    )
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump([f"reward.token={SECRET}", "seed=1"]))
    hydra_cfg = {
        "hydra": {
            "overrides": {"task": [f"reward.token={SECRET}", "seed=1"]},
            "job": {"override_dirname": f"reward.token={SECRET},seed=1", "name": "x"},
        }
    }
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra_cfg))
    (tmp_path / "other.txt").write_text("untouched " + SECRET)
    changed = redact_run_dir(tmp_path)
    assert sorted(p.name for p in changed) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        assert SECRET not in (hydra_dir / name).read_text()
    assert yaml.safe_load((hydra_dir / "config.yaml").read_text()) == {
        "reward": {"token": REDACTED, "url": "u"},
        "seed": 1,
    }
    job = yaml.safe_load((hydra_dir / "hydra.yaml").read_text())["hydra"]["job"]
    assert job["override_dirname"] == f"reward.token={REDACTED},seed=1" and job["name"] == "x"
    assert (tmp_path / "other.txt").read_text() == "untouched " + SECRET  # only Hydra's three files
    assert redact_run_dir(tmp_path) == []  # idempotent
    assert redact_run_dir(tmp_path / "no_such_run") == []


def test_redact_run_dir_also_removes_extra_secrets(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"note": f"from env {SECRET}"}))
    redact_run_dir(tmp_path, extra_secrets=[SECRET])
    assert SECRET not in (tmp_path / ".hydra" / "config.yaml").read_text()


def test_read_token_inline_file_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TOKEN_VAR", "from-env")
    file = tmp_path / "token"
    file.write_text("from-file\n")
    assert read_token("inline", "MY_TOKEN_VAR", file, "x") == "inline"
    assert read_token(None, "MY_TOKEN_VAR", file, "x") == "from-file"
    assert read_token(None, "MY_TOKEN_VAR", None, "x") == "from-env"
    monkeypatch.delenv("MY_TOKEN_VAR")
    assert read_token(None, "MY_TOKEN_VAR", None, "x") is None
    with pytest.raises(ConfigError, match=r"reward\.token_file=.*cannot read the token file"):
        read_token(None, None, tmp_path / "missing", "reward.token_file")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="the token file is empty"):
        read_token(None, None, tmp_path / "empty", "reward.token_file")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def token_server(tmp_path) -> Iterator[tuple[str, subprocess.Popen]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLCM_REWARD_TOKEN": SECRET}
    args = [
        sys.executable,
        "-m",
        "rlcm_exp.reward_server",
        "reward=jpeg_compressibility",
        "port=0",
        "device=cpu",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    assert proc.stdout is not None
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        pytest.fail(f"server did not start: {proc.communicate(timeout=30)}")
    yield match.group(1), proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.subprocess
def test_a_training_run_writes_no_secret_into_its_run_dir(token_server, tmp_path):
    """Needs rlcm_exp/training/build.py to call `redact` on RUN_DIR/config.yaml and the tracker's
    config and `redact_run_dir(run_dir)` at run start (record_run / resolved_config there)."""
    url, _ = token_server
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RLCM_REWARD_TOKEN"}
    args = [sys.executable, "-m", "rlcm_exp", "model=tiny", "task=compression", "reward=remote"]
    args += [f"reward.url={url}", f"reward.token={SECRET}", "train.epochs=1", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()  # the run scored through the server with the token
    leaks = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if SECRET in str(p.relative_to(run_dir)) or (p.is_file() and SECRET.encode() in p.read_bytes())
    ]
    assert leaks == []

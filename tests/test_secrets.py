"""rlcm_exp.secrets: which keys are secret, `redact` of configs and overrides, `redact_run_dir` of
Hydra's saved files, `read_token` (inline, file, environment); and, end to end, that a training run
against a real reward server with `reward.token=SECRET` leaves the secret in no file of its run dir."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.remote import remote
from rlcm_exp.secrets import (
    REDACTED,
    RedactingStream,
    is_secret_key,
    read_token,
    redact,
    redact_run_dir,
    redact_url,
    secret_values,
)

from .helpers import Entry, run_entry

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


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"http://alice:{SECRET}@host:8060/x", f"http://alice:{REDACTED}@host:8060/x"),
        (f"reward.url=https://u:{SECRET}@h", f"reward.url=https://u:{REDACTED}@h"),
        (f"see http://h/score?token={SECRET}&n=2", f"see http://h/score?token={REDACTED}&n=2"),
        ("http://h:8060/score?page=2", "http://h:8060/score?page=2"),  # nothing secret: kept
        ("http://alice@h:8060", "http://alice@h:8060"),  # a user name alone is not a secret
    ],
)
def test_redact_url_hides_credentials_only(text, shown):
    assert redact_url(text) == shown


def test_url_credentials_are_redacted_in_configs_and_found_as_secrets():
    cfg = {
        "reward": {"url": f"http://alice:{SECRET}@127.0.0.1:8060"},
        "overrides": [f"reward.url=http://a:{SECRET}@h"],
    }
    assert SECRET not in repr(redact(cfg)) and "alice" in repr(redact(cfg))
    assert secret_values(cfg) == {SECRET}


def test_redacting_stream_hides_given_secrets_and_url_credentials():
    out = io.StringIO()
    stream = RedactingStream(out, [SECRET, "ab"])  # too short to replace blindly
    stream.write(f"token {SECRET} at http://u:pw@h and ab\n")
    stream.add(["another-secret"])
    stream.write("another-secret\n")
    assert out.getvalue() == f"token {REDACTED} at http://u:{REDACTED}@h and ab\n{REDACTED}\n"


@pytest.mark.parametrize("token", [f"{SECRET}\u2603", f"{SECRET} x", f"{SECRET}\n", " "])
def test_a_token_no_http_header_can_carry_is_refused_without_showing_it(token):
    with pytest.raises(ConfigError) as info:
        remote(url=f"http://alice:{SECRET}@127.0.0.1:9/", token=token)
    assert SECRET not in str(info.value) and "reward.token" in str(info.value)


def test_the_remote_reward_shows_its_url_without_credentials():
    client = remote(url=f"http://alice:{SECRET}@127.0.0.1:9/?api_key={SECRET}", token="abc", max_retries=0)
    assert SECRET not in client.url + repr(client) + repr(client.models)
    with pytest.raises(Exception) as info:  # nothing listens on port 9: the error names the URL
        client(torch.zeros(1, 3, 8, 8), ["a"])
    assert SECRET not in str(info.value) and "127.0.0.1:9" in str(info.value)


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
    args = ["model=tiny", "task=compression", "reward=remote"]
    args += [f"reward.url={url}", f"reward.token={SECRET}", "train.epochs=1", f"hydra.run.dir={run_dir}"]
    # the entry point in its own process, forked from one that imported the package (helpers.Entry)
    proc = run_entry(args, {**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()  # the run scored through the server with the token
    leaks = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if SECRET in str(p.relative_to(run_dir)) or (p.is_file() and SECRET.encode() in p.read_bytes())
    ]
    assert leaks == []


@pytest.mark.subprocess
def test_no_secret_of_the_command_line_reaches_stderr_or_the_run_dir(tiny_cache, tmp_path):
    """The real CLI, three ways to fail with secrets on its command line: Hydra's own banner (a key
    not in the config), a traceback after the job started (Hydra prints the overrides), and a token
    no HTTP header can carry. Neither the token nor the URL's password is printed or saved."""
    password = "pa55-" + SECRET[::-1]
    url = f"reward.url=http://alice:{password}@127.0.0.1:9/"
    small = ["model=tiny", "task=compression", "train.epochs=1", "sampler.num_steps=2", "logger=none"]
    small += ["train.samples_per_epoch=8", "train.sample_batch_size=8", "train.train_batch_size=4"]
    small += ["train.samples_per_step=8", "train.save_images=0"]
    argvs = {
        "banner": [*small, f"reward.token={SECRET}", f"+{url}"],
        "traceback": [*small, "reward=custom", "reward._target_=tests.user_reward.crashing"]
        + [f"+reward.token={SECRET}", f"+{url}"],
        "header": [*small, "reward=remote", url, f"reward.token='{SECRET}\u2603'"],
    }
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    procs = {  # each its own process, forked from one that imported the package (helpers.Entry)
        name: Entry([*argv, f"hydra.run.dir={tmp_path / name}"], env, cwd=ROOT)
        for name, argv in argvs.items()
    }
    done = {name: proc.wait(timeout=600) for name, proc in procs.items()}
    results = {name: ((res.stdout, res.stderr), res.returncode) for name, res in done.items()}
    (_, banner), code = results["banner"]
    assert code != 0 and "reward.token" in banner and REDACTED in banner
    (_, crashed), code = results["traceback"]
    assert code != 0 and "the scorer crashed" in crashed and f"+reward.token={REDACTED}" in crashed
    (_, header), code = results["header"]
    assert code == 2 and "outside Latin-1" in header and header.strip().count("\n") == 0
    for name, ((out, err), _) in results.items():
        assert SECRET not in out + err and password not in out + err, name
    saved = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in saved)  # the crashed run saved its config
    leaks = [
        str(p) for p in saved if SECRET.encode() in p.read_bytes() or password.encode() in p.read_bytes()
    ]
    assert leaks == []

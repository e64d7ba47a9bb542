"""One reward contract everywhere: a plain function reward `fn(images, prompts, **options)` is built
by `build_reward`, served by a real reward server process and scored through the remote client,
used as a `weighted` component, and trained with; plus the output contract and the image conversion."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.base import as_reward_dict, build_reward, to_uint8
from rlcm_exp.rewards.combine import weighted
from rlcm_exp.rewards.jpeg import jpeg_size_kb
from rlcm_exp.rewards.remote import remote

from .helpers import run_entry

TARGET = "tests.test_reward_contract.redness"
PROMPTS = ["a red apple", "a blue sky", "a green field"]
ROOT = Path(__file__).resolve().parents[1]


def redness(images: torch.Tensor, prompts: list[str], scale: float = 1.0) -> np.ndarray:
    """A user's reward as the README shows it: a plain function; returns numpy, which the contract allows."""
    return scale * images[:, 0].mean(dim=(1, 2)).detach().cpu().numpy()


def images(n: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    # 8-bit values, so a PNG round trip to the server is exact
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).round() / 255


def expected(x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    return scale * x[:, 0].mean(dim=(1, 2))


# ----------------------------------------------------------------------------- (a) the builder


def test_build_reward_binds_a_plain_function_from_the_composed_config():
    cfg = compose("config", ["reward=custom", f"reward._target_={TARGET}", "+reward.scale=2.0"])
    reward = build_reward(cfg.reward, "cpu")
    x = images()
    out = as_reward_dict(reward(x, PROMPTS), len(x))
    assert set(out) == {"reward"} and out["reward"].dtype == torch.float32
    torch.testing.assert_close(out["reward"], expected(x))


def test_build_reward_passes_the_device_to_builders_and_names_bad_targets():
    reward = build_reward(OmegaConf.create({"_target_": "rlcm_exp.rewards.jpeg.jpeg_compressibility"}), "cpu")
    x = images()
    torch.testing.assert_close(reward(x, PROMPTS), -jpeg_size_kb(x))
    with pytest.raises(ConfigError, match=r"reward\._target_=no_such_module\.fn cannot be imported"):
        build_reward(OmegaConf.create({"_target_": "no_such_module.fn"}), "cpu")
    with pytest.raises(ConfigError, match="no _target_"):
        build_reward(OmegaConf.create({"scale": 1.0}), "cpu")


# ----------------------------------------------------------------------------- the output contract


def test_as_reward_dict_takes_every_form_and_refuses_wrong_counts():
    for value in (torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]), [1.0, 2.0], torch.tensor([[1.0], [2.0]])):
        out = as_reward_dict(value, 2)
        assert list(out) == ["reward"] and out["reward"].dtype == torch.float32
        assert out["reward"].tolist() == [1.0, 2.0]
    out = as_reward_dict({"reward": [1, 2], "shape": np.array([0.0, 1.0])}, 2)
    assert set(out) == {"reward", "shape"} and out["shape"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"expected 'reward' of shape \(3,\)"):
        as_reward_dict([1.0, 2.0], 3)
    with pytest.raises(ConfigError, match="for 2 images"):
        as_reward_dict({"shape": [1.0, 2.0]}, 2)  # no "reward"
    with pytest.raises(ConfigError, match="for 2 images"):
        as_reward_dict({"reward": [1.0, 2.0], "shape": [1.0]}, 2)


@pytest.mark.parametrize(
    ("kind", "shown"),
    [
        ("none", "returned None"),
        ("string", "returned a str"),
        ("strings", r"returned a list of 2 items \(str\)"),
        ("matrix", r"\{'reward': \(6,\)\}"),
        ("dict_none", r"a dict with 'reward': None"),
    ],
)
def test_a_user_reward_breaking_the_contract_is_named(kind, shown):
    """A custom reward that returns the wrong shape, strings or None: one ConfigError naming its
    `_target_` and the contract, whatever calls it (trainer, evaluation, server)."""
    reward = build_reward(OmegaConf.create({"_target_": "tests.user_reward.returns", "kind": kind}), "cpu")
    with pytest.raises(ConfigError, match=shown) as info:
        reward(images(2), ["a", "b"])
    message = str(info.value)
    assert message.startswith("reward._target_=tests.user_reward.returns returned") and "(2,)" in message
    assert build_reward(OmegaConf.create({"_target_": "tests.user_reward.mean_red"}))(images(2), ["a", "b"])[
        "reward"
    ].shape == (2,)


def test_to_uint8_clamps_scales_rounds_and_goes_channels_last():
    x = torch.tensor([-0.5, 0.0, 0.2, 0.5, 1.0, 1.7]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 6, 3)
    assert out[0, 0, :, 0].tolist() == [0, 0, 51, 128, 255, 255]  # 0.5 * 255 = 127.5 rounds to even 128
    assert to_uint8(x[0]).shape == (1, 6, 3)  # one (3, H, W) image -> (H, W, 3)
    np.testing.assert_array_equal(to_uint8(x.half()), out)  # computed in float32 whatever comes in


# ----------------------------------------------------------------------------- (b) the server


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """`python -m rlcm_exp.reward_server reward=custom reward._target_=<plain function>` on 127.0.0.1."""
    args = [sys.executable, "-m", "rlcm_exp.reward_server", "reward=custom", f"reward._target_={TARGET}"]
    args += ["+reward.scale=2.0", "host=127.0.0.1", "port=0", "device=cpu", "max_wait_ms=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # printed once the reward is built and the port is bound
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if not match:
            proc.kill()
            pytest.fail(f"server did not start: {line!r}\n{proc.stderr.read()}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.subprocess
def test_a_plain_function_is_served_and_scored_through_the_client(server):
    client = remote(server, max_retries=0, wait_for_server_s=30)
    assert client.health()["target"] == TARGET
    x = images(5)
    scores = client(x, PROMPTS + PROMPTS[:2])
    assert scores.shape == (5,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected(x))


# ----------------------------------------------------------------------------- (c) weighted


def test_a_plain_function_is_a_weighted_component():
    cfg = OmegaConf.create(
        {
            "_target_": "rlcm_exp.rewards.combine.weighted",
            "_recursive_": False,
            "components": {
                "red": {"_target_": TARGET, "scale": 2.0},
                "jpeg": {"_target_": "rlcm_exp.rewards.jpeg.jpeg_compressibility"},
            },
            "weights": {"red": 1.0, "jpeg": 0.5},
        }
    )
    reward = build_reward(cfg, "cpu")  # what the trainer does with reward=weighted
    x = images()
    out = as_reward_dict(reward(x, PROMPTS), len(x))
    assert set(out) == {"reward", "red", "jpeg"}
    torch.testing.assert_close(out["red"], expected(x))
    torch.testing.assert_close(out["reward"], out["red"] + 0.5 * out["jpeg"])
    bad = OmegaConf.create({"red": {"_target_": "no_such_module.fn"}})
    with pytest.raises(ConfigError, match=r"reward\.components\.red\._target_=no_such_module\.fn"):
        weighted(bad, {"red": 1.0})


# ----------------------------------------------------------------------------- (d) training


@pytest.mark.subprocess
def test_a_plain_function_trains_through_the_entry_point(tiny_cache, tmp_path):
    run_dir = tmp_path / "run"
    cmd = ["model=tiny", "task=compression", "train.epochs=1"]
    cmd += ["reward=custom", f"reward._target_={TARGET}", "+reward.scale=2.0", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = run_entry(cmd, env, cwd=ROOT, timeout=900)  # its own process, forked from one that imported it
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records and all(0.0 <= r["reward_mean"] <= 2.0 for r in records)


def test_model_rewards_share_their_runtime_keys_and_name_a_typo() -> None:
    """reward.dtype / device / batch_size are declared once (rewards.hub.ModelRuntime): a builder taking
    them as **runtime still gets the trainer's device, and a misspelt key is named, not ignored."""
    from rlcm_exp.errors import ConfigError
    from rlcm_exp.rewards.base import keywords
    from rlcm_exp.rewards.clip import clip_score
    from rlcm_exp.rewards.hub import runtime_settings

    assert {"dtype", "device", "batch_size", "model_id"} <= keywords(clip_score)
    assert runtime_settings({"device": "cuda:1"}, batch_size=16) == ("float32", "cuda:1", 16)
    with pytest.raises(ConfigError, match=r"reward\.devcie is not a setting"):
        runtime_settings({"devcie": "cpu"})  # type: ignore[typeddict-unknown-key]


def test_shared_keyword_groups_are_declared_once_and_name_a_typo() -> None:
    """The aesthetic rewards' head keys (HeadRewardSettings) and the server rewards' retry keys
    (rewards.retry.RetryPolicy) are keywords of their builders, and a misspelt one is named before
    anything loads or connects."""
    from rlcm_exp.errors import ConfigError
    from rlcm_exp.rewards.aesthetic import aesthetic
    from rlcm_exp.rewards.aesthetic_v25 import aesthetic_v25
    from rlcm_exp.rewards.base import keywords
    from rlcm_exp.rewards.remote import remote
    from rlcm_exp.rewards.retry import retry_settings
    from rlcm_exp.rewards.vlm_judge import vlm_judge

    head = {"head_url", "head_sha256", "head_local_path", "cache_dir", "download_timeout_s", "device"}
    assert head <= keywords(aesthetic) and head <= keywords(aesthetic_v25)
    retry = {"timeout_s", "max_retries", "backoff_s", "max_backoff_s"}
    assert retry <= keywords(remote) and retry <= keywords(vlm_judge)
    assert retry_settings({"max_retries": 0}, timeout_s=120.0) == (120.0, 0, 2.0, 60.0)
    with pytest.raises(ConfigError, match=r"reward\.max_retires is not a setting.*retry settings"):
        remote("http://127.0.0.1:9", max_retires=0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"reward\.head_ulr is not a setting"):
        aesthetic(head_ulr="x")  # type: ignore[call-arg]


# ----------------------------------------------------------------------------- pins of the shipped configs


def _pins(node: object, where: str) -> Iterator[tuple[str, str, object]]:
    """(path, kind, value) for every pin a reward config must hold: each hub revision, and the sha256 of
    each single downloaded file (a `*_url`, or a `*_file` holding weights, names its `*_sha256`)."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        path = f"{where}.{key}"
        if key.endswith("revision"):
            yield path, "revision", value
        elif key.endswith("_url") and key != "base_url":
            yield path, "sha256", node.get(key[: -len("_url")] + "_sha256")
        elif key.endswith("_file") and str(value).endswith((".pt", ".pth", ".bin", ".safetensors")):
            yield path, "sha256", node.get(key[: -len("_file")] + "_sha256")
        yield from _pins(value, path)


def test_every_shipped_reward_config_pins_hub_revisions_and_downloaded_files():
    """Real hub ids at a commit, never a moving branch; each single file fetched by URL or from a hub
    repo has the sha256 it must have (the loaders refuse a mismatch)."""
    found = []
    for path in sorted((ROOT / "conf" / "reward").glob("*.yaml")):
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        for where, kind, value in _pins(cfg, path.stem):
            pattern = r"[0-9a-f]{40}" if kind == "revision" else r"[0-9a-f]{64}"
            assert isinstance(value, str) and re.fullmatch(pattern, value), (
                f"{where}: {kind} {value!r} is not pinned"
            )
            found.append(where)
    # hpsv2, imagereward (+ its tokenizer), aesthetic_v25, aesthetic, clip_score, pickscore (+ processor),
    # llava_bertscore (VLM + BERTScore), weighted (its two CLIPs); sha256: two heads and two checkpoints
    assert len(found) >= 16, found


def test_the_readme_rewards_table_gives_every_shipped_reward_its_meaning_range_licence_and_place():
    text = (ROOT / "README.md").read_text()
    header = "| reward | what it measures | range (higher is better) | licence | runs on |"
    lines = text[text.index(header) :].splitlines()[2:]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[: lines.index("")]]
    assert all(len(r) == 5 and all(r) for r in rows), [r for r in rows if len(r) != 5 or not all(r)]
    named = {name for r in rows for name in re.findall(r"`([a-z0-9_]+)`", r[0])}
    shipped = {p.stem for p in (ROOT / "conf" / "reward").glob("*.yaml")}
    assert shipped <= named, sorted(shipped - named)

"""Several rewards in one server (issue 30, server part): `python -m rlcm_exp.reward_server
rewards=[ocr,jpeg_compressibility] rewards.ocr.num_threads=1` as a real process on 127.0.0.1, the
OCR reward (the real PP-OCRv4 models of the rapidocr-onnxruntime wheel) scoring PIL-rendered words
through it exactly as in process; plus the rewards= syntax and its errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlcm_exp.configs import compose
from rlcm_exp.errors import ConfigError
from rlcm_exp.reward_server import parse_args
from rlcm_exp.rewards.base import build_reward
from rlcm_exp.rewards.remote import RewardServerError, remote

from .helpers import WORDS, render

pytestmark = pytest.mark.subprocess  # every test here talks to a server process

pytest.importorskip("rapidocr_onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("ocr_server") / "stderr.txt"
    cmd = [sys.executable, "-m", "rlcm_exp.reward_server", "rewards=[ocr,jpeg_compressibility]"]
    cmd += ["rewards.ocr.num_threads=1", "port=0", "device=cpu", "reward_timeout_s=60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLCM_REWARD_TOKEN": ""}
    with log.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", proc.stdout.readline())
        assert match, f"server did not start:\n{log.read_text()}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ocr_through_the_server_scores_rendered_words_as_in_process(server):
    images = render(WORDS)
    own = [f'a sign that says "{w}"' for w in WORDS]
    other = [f'the word "{WORDS[(i + 1) % len(WORDS)]}"' for i in range(len(WORDS))]
    client = remote(server, server_reward="ocr", max_retries=0, timeout_s=120, wait_for_server_s=30)
    served_own, served_other = client(images, own), client(images, other)
    assert (served_own > 0.8).all() and (served_other < 0.3).all(), (served_own, served_other)
    local = build_reward(compose("config", ["reward=ocr", "reward.num_threads=1"]).reward, "cpu")
    assert torch.equal(served_own, local(images, own)) and torch.equal(served_other, local(images, other))
    # the other reward of the same server, by name; the first (ocr) is the default
    jpeg = remote(server, server_reward="jpeg_compressibility", max_retries=0, timeout_s=60)
    local_jpeg = build_reward(compose("config", ["reward=jpeg_compressibility"]).reward, "cpu")
    assert torch.allclose(jpeg(images, own), local_jpeg(images, own))
    assert torch.equal(remote(server, max_retries=0, timeout_s=120)(images, own), served_own)


def test_health_names_each_reward_and_its_state(server):
    info = remote(server, max_retries=0).health()
    assert info["status"] == "ok" and info["reward"] == "ocr"
    assert list(info["rewards"]) == ["ocr", "jpeg_compressibility"]
    assert {r["state"] for r in info["rewards"].values()} == {"ok"}
    assert info["rewards"]["ocr"]["target"] == "rlcm_exp.rewards.ocr.ocr"
    with pytest.raises(RewardServerError, match="serves no reward 'aesthetic'"):
        remote(server, server_reward="aesthetic", max_retries=0).health()
    with pytest.raises(RewardServerError, match="HTTP 404.*/score/ocr"):
        remote(server, server_reward="aesthetic", max_retries=0)(render(["hi"]), ['"hi"'])


def test_the_rewards_syntax_a_list_or_a_mapping_with_per_reward_overrides():
    _, rewards = parse_args(["rewards=[ocr,jpeg_compressibility]", "rewards.ocr.num_threads=1"])
    assert rewards == {
        "ocr": ["+reward=ocr", "reward.num_threads=1"],
        "jpeg_compressibility": ["+reward=jpeg_compressibility"],
    }
    _, rewards = parse_args(["rewards={text:ocr,small:jpeg_compressibility}", "+rewards.text.extra=1"])
    assert rewards == {"text": ["+reward=ocr", "+reward.extra=1"], "small": ["+reward=jpeg_compressibility"]}
    _, rewards = parse_args(["reward=ocr", "reward.num_threads=2"])  # one reward, as before
    assert rewards == {"ocr": ["+reward=ocr", "reward.num_threads=2"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reward=ocr", "rewards=[ocr]"], "one of them, once"),
        (["rewards=[]"], "non-empty list"),
        (["rewards=[ocr,ocr]"], "distinct"),
        (["rewards=[ocr]", "rewards.jpeg.quality=3"], "NAME one of ocr"),
        (["rewards=[ocr]", "reward.num_threads=1"], "rewards.NAME.KEY=VALUE"),
        (["rewards=[ocr"], "not a list"),
    ],
)
def test_bad_rewards_arguments_are_one_line_errors(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(args)

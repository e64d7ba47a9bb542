"""The reward server as a real process on 127.0.0.1 serving a tiny LLaVA + BERTScore, its client,
and the client against small misbehaving http.server stubs (down, slow, 503, bad JSON, wrong count)."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertTokenizer,
    CLIPImageProcessor,
    DebertaConfig,
    DebertaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from rlcm_exp import reward_server
from rlcm_exp.rewards.llava import llava_bertscore
from rlcm_exp.rewards.remote import RemoteReward, RewardServerError, remote
from rlcm_exp.serving.server import RequestError, decode_images

TOKEN = "test-token-123"
WORDS = [
    "the",
    "image",
    "contains",
    "a",
    "an",
    "cat",
    "dog",
    "bird",
    "riding",
    "bike",
    "playing",
    "chess",
    "washing",
    "dishes",
]
QUESTION_WORDS = [
    "USER:",
    "ASSISTANT:",
    "Answer",
    "concisely:",
    "what",
    "is",
    "going",
    "on",
    "in",
    "this",
    "image?",
]
PROMPTS = ["a cat riding a bike", "a dog playing chess", "a bird washing the dishes"]


def save_tiny_llava(folder: Path) -> Path:
    """A LLaVA-1.5-shaped model (CLIP vision tower, projector, Llama LM) and processor, 32-d wide."""
    vocab = {
        w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", "<image>", *QUESTION_WORDS, *WORDS])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    ).save_pretrained(folder)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    vision |= dict(num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    text = dict(
        model_type="llama", vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1
    )
    text |= dict(num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    text |= dict(pad_token_id=1, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_deberta(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(1)
    config = DebertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2
    )
    config.num_attention_heads, config.max_position_embeddings = 2, 64
    DebertaModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llava_bertscore")
    llava = save_tiny_llava(root / "llava")
    deberta = save_tiny_deberta(root / "deberta")
    return {
        "reward.vlm_local_path": str(llava),
        "reward.bertscore_local_path": str(deberta),
        "reward.bertscore_num_layers": "2",
        "reward.max_new_tokens": "6",
    }


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory) -> Iterator[str]:
    """`python -m rlcm_exp.reward_server reward=llava_bertscore ...` as a real process; yields its URL."""
    log = tmp_path_factory.mktemp("server") / "stderr.txt"
    args = [
        sys.executable,
        "-m",
        "rlcm_exp.reward_server",
        "reward=llava_bertscore",
        "host=127.0.0.1",
        "port=0",
    ]
    args += [f"token={TOKEN}", "max_request_mb=0.25", "max_batch=8", "max_wait_ms=100", "device=cpu"]
    args += [f"{k}={v}" for k, v in tiny_models.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the models are loaded and the port is bound
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, f"server did not start: {line!r}\n{log.read_text()}"
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def client(url: str, **kwargs: Any) -> RemoteReward:
    settings: dict[str, Any] = {"token": TOKEN, "timeout_s": 60.0, "max_retries": 0, "backoff_s": 0.01}
    return remote(url, **(settings | kwargs))


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    # rounded to 8 bits so the PNG round trip is exact and server scores can be compared in-process
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x * 255).round() / 255


# ----------------------------------------------------------------------------- the real server


@pytest.mark.subprocess
def test_health_reports_the_loaded_models(server, tiny_models):
    reward = remote(server, token=TOKEN, wait_for_server_s=30)
    info = reward.health()
    assert info["reward"] == "llava_bertscore" and info["token_required"] is True
    assert info["models"]["vlm"] == f"{tiny_models['reward.vlm_local_path']} (local)"
    assert info["models"]["bertscore"] == f"{tiny_models['reward.bertscore_local_path']} (local)"
    assert reward.models["vlm"] == info["models"]["vlm"]
    assert TOKEN not in repr(reward)


@pytest.mark.subprocess
def test_concurrent_clients_are_batched_and_match_in_process_scores(server, tiny_models):
    reward = client(server)
    calls_before = reward.health()["reward_calls"]
    batches = [(images(2, seed=i), [PROMPTS[i % 3], PROMPTS[(i + 1) % 3]]) for i in range(6)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(batches))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = reward(*batches[i])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    calls = reward.health()["reward_calls"] - calls_before
    assert 1 <= calls < len(batches)  # requests were merged into fewer reward calls

    overrides = {k.removeprefix("reward."): v for k, v in tiny_models.items()}
    local = llava_bertscore(
        vlm_local_path=overrides["vlm_local_path"],
        bertscore_local_path=overrides["bertscore_local_path"],
        bertscore_num_layers=2,
        max_new_tokens=6,
    )
    for i, (x, prompts) in enumerate(batches):
        assert results[i].shape == (2,) and results[i].dtype == torch.float32
        torch.testing.assert_close(results[i], local(x, prompts), atol=1e-4, rtol=0)


@pytest.mark.subprocess
def test_missing_or_wrong_token_is_refused_with_401(server):
    for token in (None, "wrong"):
        with pytest.raises(RewardServerError, match=r"HTTP 401.*reward\.token"):
            client(server, token=token)(images(1), PROMPTS[:1])
    conn = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 401


@pytest.mark.subprocess
def test_requests_over_the_size_limit_get_413(server):
    noisy = torch.rand(4, 3, 160, 160)  # incompressible PNGs: about 0.4 MB of base64, over 0.25 MB
    with pytest.raises(RewardServerError, match=r"HTTP 413.*max_request_mb"):
        client(server, max_images_per_request=4)(noisy, PROMPTS[:3] + PROMPTS[:1])
    # split into requests that fit, the same batch is scored
    scores = client(server, max_images_per_request=1)(noisy, PROMPTS[:3] + PROMPTS[:1])
    assert scores.shape == (4,) and torch.isfinite(scores).all()


@pytest.mark.subprocess
def test_jpeg_transport_and_the_pixel_limit(server):
    scores = client(server, image_format="jpeg")(images(2), PROMPTS[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    with pytest.raises(RequestError, match="over max_pixels=1000") as err:
        decode_images([base64.b64encode(png.getvalue()).decode()], max_pixels=1000)
    assert err.value.status == 413


def _post(url: str, body: bytes, token: str = TOKEN) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
    conn.request("POST", "/score", body=body, headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.subprocess
def test_bad_requests_get_400_and_nothing_is_unpickled(server):
    status, answer = _post(server, b"not json")
    assert status == 400 and "not JSON" in answer["error"]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")  # a real image, but not an accepted format
    pickle_bytes = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01a\x94."
    for payload in (base64.b64encode(gif.getvalue()), base64.b64encode(pickle_bytes), b"!!"):
        status, answer = _post(server, json.dumps({"images": [payload.decode()], "prompts": ["a"]}).encode())
        assert status == 400 and "not a base64 PNG or JPEG" in answer["error"]
    status, answer = _post(server, json.dumps({"images": [], "prompts": []}).encode())
    assert status == 400


# ----------------------------------------------------------------------------- misbehaving stubs


class Stub:
    """A real http.server on 127.0.0.1 whose /score answers are scripted per hit."""

    def __init__(self, answers: list[tuple[float, int, bytes]]) -> None:
        self.answers, self.hits = answers, 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                delay, status, body = stub.answers[min(stub.hits, len(stub.answers) - 1)]
                stub.hits += 1
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up waiting
                    pass

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    stubs: list[Stub] = []

    def make(*answers: tuple[float, int, bytes]) -> Stub:
        stubs.append(Stub(list(answers)))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def ok(*scores) -> bytes:
    return json.dumps({"rewards": list(scores)}).encode()


def test_a_dead_server_stops_the_run_after_bounded_retries():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RewardServerError, match=r"did not answer /score after 3 attempt\(s\).*reward_server"):
        remote(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.01)(images(2), PROMPTS[:2])
    with pytest.raises(RewardServerError, match="did not answer /health"):
        remote(f"http://127.0.0.1:{port}", max_retries=0, wait_for_server_s=0.1)


def test_a_slow_server_times_out_then_errors_or_recovers(stub):
    slow = stub((2.0, 200, ok(1.0)))
    with pytest.raises(RewardServerError, match=r"2 attempt\(s\).*timed out.*reward\.timeout_s"):
        remote(slow.url, timeout_s=0.3, max_retries=1, backoff_s=0.01)(images(1), PROMPTS[:1])
    assert slow.hits == 2
    once = stub((2.0, 200, ok(1.0)), (0.0, 200, ok(0.5)))
    scores = remote(once.url, timeout_s=0.3, max_retries=1, backoff_s=0.01)(images(1), PROMPTS[:1])
    assert scores.tolist() == [0.5] and once.hits == 2


def test_503_is_retried_a_bounded_number_of_times(stub):
    busy = stub((0.0, 503, b'{"error": "loading"}'))
    with pytest.raises(RewardServerError, match=r"4 attempt\(s\).*HTTP 503: loading"):
        remote(busy.url, max_retries=3, backoff_s=0.01)(images(1), PROMPTS[:1])
    assert busy.hits == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>oops</html>", "not JSON"),
        (ok(1.0, 2.0), "2 scores for 3 images"),
        (b'{"rewards": [1.0, "x", 2.0]}', "other than numbers"),
        (b'{"scores": [1.0, 2.0, 3.0]}', "'rewards' is NoneType"),
        (json.dumps({"rewards": [1, 2, 3], "components": {"a": [1]}}).encode(), "1 scores for 3 images"),
    ],
)
def test_malformed_answers_are_clear_errors_not_retried(stub, body, message):
    bad = stub((0.0, 200, body))
    with pytest.raises(RewardServerError, match=re.escape(message)):
        remote(bad.url, max_retries=3, backoff_s=0.01)(images(3), PROMPTS)
    assert bad.hits == 1


def test_server_errors_and_non_finite_scores(stub):
    broken = stub((0.0, 500, b'{"error": "the reward raised CUDA OOM"}'))
    with pytest.raises(RewardServerError, match=r"HTTP 500: the reward raised CUDA OOM.*traceback"):
        remote(broken.url, max_retries=3)(images(1), PROMPTS[:1])
    assert broken.hits == 1
    # null is how JSON carries a non-finite score: it comes back as NaN for the trainer to handle
    nan = stub((0.0, 200, json.dumps({"rewards": [1.0, None], "components": {"x": [2.0, 3.0]}}).encode()))
    out = remote(nan.url)(images(2), PROMPTS[:2])
    assert isinstance(out, dict) and out["reward"][0] == 1.0 and torch.isnan(out["reward"][1])
    assert out["x"].tolist() == [2.0, 3.0]


# ----------------------------------------------------------------------------- CLI errors


def test_cli_errors_are_one_paragraph(capsys):
    assert reward_server.main(["reward=llava_bertscore", "prot=8060"]) == 2
    assert "unknown argument 'prot=8060'" in capsys.readouterr().err
    assert reward_server.main(["reward=no_such_reward"]) == 2
    err = capsys.readouterr().err
    assert "Available rewards:" in err and "llava_bertscore" in err
    assert reward_server.main(["port=8060"]) == 2
    assert "needs reward=NAME" in capsys.readouterr().err
    # a builder's ConfigError comes out as its one paragraph, not as Hydra's InstantiationException
    assert reward_server.main(["reward=clip_score", "reward.local_path=/no/such", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: reward.local_path=/no/such: no such folder") and "Traceback" not in err


@pytest.mark.subprocess
def test_help_prints_the_usage_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "rlcm_exp.reward_server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: python -m rlcm_exp.reward_server reward=NAME" in proc.stdout and "max_batch" in proc.stdout

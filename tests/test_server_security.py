"""The reward server under attack, as a real process on 127.0.0.1 (issue 18, "Security of the reward
server"): every attack gets its HTTP status within a second, the server keeps serving, and its
resident memory stays within RSS_GROWTH_BOUND_MB of what it held before; plus the start-up refusals
(non-loopback host without a token, port in use) and where tokens are read from.

The served reward is a plain function of this module (a plain function reward can be served)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from rlcm_exp.rewards.remote import RewardServerError, remote

from .helpers import read_all

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "security-test-token-9876"
SIDE = 256  # test images are SIDE x SIDE = max_pixels
LIMITS = {
    "max_request_mb": 2,
    "max_pending_mb": 4,
    "max_pixels": SIDE * SIDE,
    "max_request_pixels": 4 * SIDE * SIDE,  # 4 images per request
    "max_queue_pixels": 8 * SIDE * SIDE,  # 2 such requests queued or being scored
}
# What requests may make the server hold with LIMITS: about 3 x 4 MB of bodies + 16 B x 0.5 M
# pixels = 20 MB (measured: under 35 MB); the bound leaves room for threads and allocator slack.
# Without the request and queue pixel limits, the first two attacks grow the server by 200-300 MB.
RSS_GROWTH_BOUND_MB = 80
ANSWER_WITHIN_S = 1.0


def slow_mean(images: torch.Tensor, prompts: list[str], delay_s: float = 0.0) -> torch.Tensor:
    """The served reward: mean intensity, after `delay_s` (so requests pile up in the queue)."""
    time.sleep(delay_s)
    return images.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- helpers


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    stderr: Path


def start_server(
    tmp: Path, *args: str, env: dict[str, str] | None = None, preexec_fn: Callable[[], None] | None = None
) -> Server:
    """`python -m rlcm_exp.reward_server reward=custom reward._target_=<slow_mean> ...` on 127.0.0.1."""
    cmd = [sys.executable, "-m", "rlcm_exp.reward_server", "reward=custom"]
    cmd += [f"reward._target_={__name__}.slow_mean", "port=0", "device=cpu", *args]
    log = tmp / f"stderr-{time.monotonic_ns()}.txt"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=full_env,
            cwd=ROOT,
            preexec_fn=preexec_fn,
        )
    assert proc.stdout is not None
    match = re.search(r"listening on (http://[\d.]+:(\d+))", proc.stdout.readline())
    if not match:
        proc.kill()
        pytest.fail(f"server did not start:\n{log.read_text()}")
    return Server(match.group(1), int(match.group(2)), proc, log)


def stop(server: Server) -> None:
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """The server under attack: tight limits, a 0.15 s reward, its token in $RLCM_REWARD_TOKEN."""
    args = [f"{k}={v}" for k, v in LIMITS.items()] + ["+reward.delay_s=0.15", "max_wait_ms=1"]
    started = start_server(tmp_path_factory.mktemp("server"), *args, env={"RLCM_REWARD_TOKEN": TOKEN})
    yield started
    stop(started)


def png(width: int, height: int, color: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (color, color, color)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes declaring width x height 8-bit gray pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65536, 9)  # a start of the rows: the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def score_body(pngs: list[bytes]) -> bytes:
    images = [base64.b64encode(p).decode() for p in pngs]
    return json.dumps({"images": images, "prompts": ["p"] * len(images)}).encode()


def post(server: Server, body: bytes, token: str = TOKEN) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds to the answer) of one POST /score."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/score", body=body, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read()), time.monotonic() - started
    finally:
        conn.close()


def raw_request(server: Server, head: str, body: bytes = b"") -> tuple[int, dict, float]:
    """Send `head` (request line and headers, as written) and `body` on a socket kept open, so the
    server cannot wait for the client to close; (status, answer, seconds to the answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    elapsed = time.monotonic() - started
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1]), elapsed


def _length(data: bytes) -> int:
    match = re.search(rb"Content-Length: (\d+)", data)
    return int(match.group(1)) if match else 1 << 30


def head(method: str, token: str = TOKEN, *headers: str) -> str:
    return "\n".join([f"{method} /score HTTP/1.1", "Host: x", f"Authorization: Bearer {token}", *headers, ""])


@contextmanager
def rss_watch(server: Server) -> Iterator[dict[str, float]]:
    """Samples the server's resident memory every 5 ms; yields {"baseline", "peak"} in MB."""
    process = psutil.Process(server.proc.pid)
    stats = {"baseline": process.memory_info().rss / 2**20, "peak": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            stats["peak"] = max(stats["peak"], process.memory_info().rss / 2**20)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield stats
    finally:
        done.set()
        thread.join()


def assert_serves(server: Server) -> None:
    """A normal request still succeeds."""
    status, answer, _ = post(server, score_body([png(SIDE, SIDE, 51)] * 2))
    assert status == 200 and answer["rewards"] == pytest.approx([0.2, 0.2])


def assert_bounded(stats: dict[str, float]) -> None:
    growth = stats["peak"] - stats["baseline"]
    assert growth < RSS_GROWTH_BOUND_MB, f"server RSS grew by {growth:.0f} MB: {stats}"


# ----------------------------------------------------------------------------- attacks


@pytest.mark.subprocess
def test_a_request_of_many_small_images_is_refused_by_its_pixels(server):
    assert_serves(server)  # warm: the first request's allocations are not counted as growth
    body = score_body([png(SIDE, SIDE)] * 200)  # each image at max_pixels, the body ~0.2 MB
    assert len(body) < LIMITS["max_request_mb"] * 2**20
    with rss_watch(server) as stats:
        status, answer, elapsed = post(server, body)
    assert status == 413 and "max_request_pixels" in answer["error"] and elapsed < ANSWER_WITHIN_S
    assert_bounded(stats)
    assert_serves(server)


@pytest.mark.subprocess
def test_the_queue_of_decoded_images_is_bounded(server):
    """Many concurrent requests within every per-request limit: they wait for room in
    max_queue_pixels instead of all being decoded at once, and all are scored."""
    assert_serves(server)
    body = score_body([png(SIDE, SIDE, 51)] * 4)  # max_request_pixels exactly
    results: list[int] = []
    with rss_watch(server) as stats:
        threads = [threading.Thread(target=lambda: results.append(post(server, body)[0])) for _ in range(48)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert results == [200] * 48
    assert_bounded(stats)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (["Content-Length: -1"], 400),
        (["Content-Length: +5"], 400),
        (["Content-Length: 5", "Content-Length: 6"], 400),
        ([], 411),
        (["Transfer-Encoding: chunked"], 411),
    ],
)
def test_a_bad_or_missing_content_length_is_refused_before_reading(server, headers, status):
    with rss_watch(server) as stats:
        got, answer, elapsed = raw_request(server, head("POST", TOKEN, *headers), b'{"images": ')
    assert got == status and "Content-Length" in answer["error"] and elapsed < ANSWER_WITHIN_S
    assert_bounded(stats)
    assert_serves(server)


@pytest.mark.subprocess
@pytest.mark.parametrize("side", [100_000, 20_000])  # over PIL's bomb limit; under it, over max_pixels
def test_a_png_decompression_bomb_gets_413_and_the_server_goes_on(server, side):
    bomb = bomb_png(side, side)
    assert len(bomb) < 2000
    with rss_watch(server) as stats:
        status, answer, elapsed = post(server, score_body([bomb]))
    assert status == 413 and elapsed < ANSWER_WITHIN_S, answer
    assert_bounded(stats)
    assert_serves(server)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in the parser
        b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b"[" + b"{}," * 600_000 + b"{}]",  # 1.8 MB that json.loads would turn into 40 MB of dicts
        b"[" + b"1" * 100_000 + b"]",  # an integer over Python's digit limit
    ],
    ids=["deep-array", "deep-in-object", "many-values", "huge-int"],
)
def test_hostile_json_gets_400_and_the_server_goes_on(server, body):
    with rss_watch(server) as stats:
        status, answer, elapsed = post(server, body)
    assert status == 400 and elapsed < ANSWER_WITHIN_S, answer
    assert_bounded(stats)
    assert_serves(server)


@pytest.mark.subprocess
def test_the_token_comes_from_the_environment_and_is_not_on_the_command_line(server, tmp_path, monkeypatch):
    cmdline = " ".join(psutil.Process(server.proc.pid).cmdline())
    assert TOKEN not in cmdline  # what `ps` shows
    status, answer, elapsed = post(server, score_body([png(8, 8)]), token="wrong")
    assert status == 401 and elapsed < ANSWER_WITHIN_S
    x = torch.full((2, 3, 8, 8), 0.2)
    monkeypatch.setenv("MY_REWARD_TOKEN", TOKEN)
    monkeypatch.delenv("RLCM_REWARD_TOKEN", raising=False)
    by_env = remote(server.url, token_env="MY_REWARD_TOKEN", max_retries=0)
    assert by_env(x, ["a", "b"]).tolist() == pytest.approx([0.2, 0.2])
    (tmp_path / "token").write_text(TOKEN + "\n")
    by_file = remote(server.url, token_env=None, token_file=str(tmp_path / "token"), max_retries=0)
    assert by_file(x, ["a", "b"]).tolist() == pytest.approx([0.2, 0.2])
    with pytest.raises(RewardServerError, match=r"HTTP 401.*token_file"):
        remote(server.url, token_env="NO_SUCH_VARIABLE_SET", max_retries=0)(x, ["a", "b"])


@pytest.mark.subprocess
def test_an_inline_token_still_works_with_a_warning(tmp_path):
    started = start_server(tmp_path, f"token={TOKEN}", env={"RLCM_REWARD_TOKEN": ""})
    try:
        assert "visible to every user" in started.stderr.read_text()
        status, _, _ = post(started, score_body([png(8, 8)]))
        assert status == 200
        assert post(started, score_body([png(8, 8)]), token="wrong")[0] == 401
    finally:
        stop(started)


# ----------------------------------------------------------------------------- start-up refusals


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlcm_exp.reward_server", "reward=jpeg_compressibility", "device=cpu", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "RLCM_REWARD_TOKEN": "", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=120)


@pytest.mark.subprocess
def test_a_non_loopback_host_without_a_token_is_refused(tmp_path):
    proc = run_cli("host=0.0.0.0", "port=0")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "host=0.0.0.0" in lines[0] and "allow_insecure=true" in lines[0], proc.stderr
    # explicitly allowed, it starts
    started = start_server(tmp_path, "host=0.0.0.0", "allow_insecure=true", env={"RLCM_REWARD_TOKEN": ""})
    stop(started)


@pytest.mark.subprocess
def test_a_port_in_use_is_one_line_naming_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli(f"port={port}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port={port}" in lines[0] and "in use" in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("arg", "key"),
    [
        ("max_request_pixels=0", "max_request_pixels"),
        ("max_queue_pixels=10", "max_queue_pixels"),
        ("allow_insecure=maybe", "allow_insecure"),
        ("token_file=/no/such/file", "token_file"),
    ],
)
def test_bad_server_options_are_one_line_errors(arg, key, capsys):
    from rlcm_exp import reward_server

    assert reward_server.main(["reward=jpeg_compressibility", arg]) == 2
    err = capsys.readouterr().err
    assert key in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.subprocess
def test_a_process_with_few_open_files_is_not_locked_out_by_many_idle_connections(tmp_path):
    """The reported attack: more idle connections than the process may open files. A real server
    process with a limit of 160 open files and max_connections=48 faces 200 idle connections."""

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    srv = start_server(
        tmp_path, "max_connections=48", "request_timeout_s=1.5", "max_wait_ms=1", preexec_fn=few_files
    )
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(200)]
        refused = [s for s in idle[48:] if read_all(s, 1).startswith(b"HTTP/1.1 503 ")]
        assert len(refused) >= 150  # the excess is answered at once, nothing else breaks
        time.sleep(1.6)  # the idle ones reach request_timeout_s
        assert_serves(srv)
        assert srv.proc.poll() is None and "Traceback" not in srv.stderr.read_text()
    finally:
        for sock in idle:
            sock.close()
        stop(srv)

"""A reward server that cannot be starved (issue 31): a real server on 127.0.0.1 (in a thread of this
process, so a reward can be made to hang, exit or kill its worker) spoken to over real sockets.

Connection cap, whole-request deadline and minimum upload rate, the pending-body budget reserved
as bytes arrive, the per-reward timeout with per-image statuses, /health per reward (ok / stuck /
dead), a reward calling sys.exit, and the start-up checks of every setting and of the token.
Limits are small so that each test takes a few seconds; every loop is bounded in count and time."""

from __future__ import annotations

import base64
import errno
import http.client
import http.server
import io
import json
import logging
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image

from rlcm_exp import reward_server
from rlcm_exp.errors import ConfigError
from rlcm_exp.rewards.remote import RewardServerError, remote
from rlcm_exp.serving.connections import ACCEPT_PAUSE_S, CappedServer
from rlcm_exp.serving.options import ServerOptions
from rlcm_exp.serving.server import LoadedReward, serve

from .helpers import read_all

RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def mean(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


@dataclass
class Running:
    server: CappedServer
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running(rewards: dict[str, RewardFn], **settings: Any) -> Iterator[Running]:
    """A server of `rewards` on 127.0.0.1 (a free port) with `settings`, served by a thread."""
    options = ServerOptions(port=0, device="cpu", max_wait_ms=1, **settings)
    options.check()
    options.check_token()
    server = serve({n: LoadedReward(fn, f"tests.{n}") for n, fn in rewards.items()}, options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Running(server, server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def png_body(n: int, prompts: list[str] | None = None, value: int = 51) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    return json.dumps({"images": [image] * n, "prompts": prompts or ["p"] * n}).encode()


def post(port: int, body: bytes, path: str = "/score", timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ----------------------------------------------------------------------------- connections


def test_connections_over_the_cap_get_503_without_a_thread_and_clients_are_served_after_the_idle_drop():
    cap = 4
    with running({"mean": mean}, max_connections=cap, request_timeout_s=1.5) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(cap)]
        assert wait_for(lambda: srv.server.open_connections == cap, 2)
        threads = threading.active_count()
        started = time.monotonic()
        excess = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
        answers = [read_all(s, 2) for s in excess]
        assert time.monotonic() - started < 2
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 503 ") and b"max_connections=4" in answer
            assert b"Connection: close" in answer
        assert srv.server.refused == 20 and threading.active_count() <= threads  # no thread per excess
        # a well-behaved client retrying 503 is served once the idle connections hit their deadline
        client = remote(srv.url, max_retries=6, backoff_s=0.3, max_backoff_s=0.5, timeout_s=5)
        scores = client(torch.full((2, 3, 8, 8), 0.2), ["a", "b"])
        assert scores == pytest.approx(torch.tensor([0.2, 0.2]), abs=1e-2)
        assert time.monotonic() - started < 4
        assert all(read_all(s, 0.5) == b"" for s in idle)  # dropped by the server
        for s in idle + excess:
            s.close()


def test_accept_failing_for_lack_of_descriptors_pauses_instead_of_spinning():
    calls: list[float] = []

    class OutOfDescriptors:
        def accept(self) -> None:
            calls.append(time.monotonic())
            raise OSError(errno.EMFILE, "Too many open files")

    server = CappedServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    listening, server.socket = server.socket, OutOfDescriptors()  # type: ignore[assignment]
    try:
        for _ in range(3):
            with pytest.raises(OSError, match="Too many open files"):
                server.get_request()
    finally:
        listening.close()
    assert calls[-1] - calls[0] >= 2 * ACCEPT_PAUSE_S * 0.9


def test_a_client_trickling_headers_or_body_is_dropped_within_the_deadline():
    with running({"mean": mean}, request_timeout_s=1.0, min_upload_kb_s=1) as srv:
        # headers one byte every 0.1 s: the request line and headers must all arrive within 1 s
        head = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            started, dropped = time.monotonic(), False
            for byte in head[:40]:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    dropped = True
                    break
                if read_ready(sock):
                    dropped = True
                    break
                time.sleep(0.1)
            assert dropped or read_all(sock, 1) == b""
            assert time.monotonic() - started < 2.0
        # body at 100 bytes/s against a minimum of 1 KB/s: 408 and closed within ~1 s
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(head)
            started, answer = time.monotonic(), b""
            for _ in range(40):
                try:
                    sock.sendall(b"x" * 10)
                except OSError:
                    break
                if read_ready(sock):
                    answer = read_all(sock, 1)
                    break
                time.sleep(0.1)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"min_upload_kb_s" in answer
            assert time.monotonic() - started < 2.0
        assert post(srv.port, png_body(1))[0] == 200


def read_ready(sock: socket.socket) -> bool:
    """Whether the server has sent something or closed (without waiting)."""
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_declared_huge_slow_bodies_do_not_starve_a_normal_request():
    # the pending-body budget holds one whole request; four clients declare that much and trickle
    with running({"mean": mean}, max_request_mb=1, max_pending_mb=1, request_timeout_s=5) as srv:
        head = f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: {2**20}\r\n\r\n".encode()
        slow = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(4)]
        for sock in slow:
            sock.sendall(head + b'{"images": [')
        time.sleep(0.2)
        for _ in range(5):  # every normal request is served while the slow ones hold their bodies open
            status, answer = post(srv.port, png_body(2))
            assert status == 200 and answer["rewards"] == pytest.approx([0.2, 0.2], abs=1e-2)
        for sock in slow:
            sock.close()


# ----------------------------------------------------------------------------- rewards that hang or exit


def hangs_on(release: threading.Event) -> RewardFn:
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if "hang" in prompts:
            release.wait(30)  # bounded: the test releases it at its end
        return images.mean(dim=(1, 2, 3))

    return reward


def test_a_hanging_reward_is_answered_within_its_timeout_with_items_marked_and_health_says_stuck(caplog):
    release = threading.Event()
    rewards = {"hangs": hangs_on(release), "mean": mean}
    with running(rewards, reward_timeout_s=0.5, max_batch=2) as srv:
        try:
            started = time.monotonic()
            # 4 images in calls of 2: the first call scores, the second hangs
            status, answer = post(srv.port, png_body(4, ["a", "b", "hang", "c"]))
            assert 0.5 <= time.monotonic() - started < 2.0
            assert status == 200 and answer["status"] == ["ok", "ok", "timeout", "timeout"]
            assert answer["rewards"][:2] == pytest.approx([0.2, 0.2], abs=1e-2)
            assert answer["rewards"][2:] == [None, None]
            info = health(srv.port)
            assert info["status"] == "stuck" and info["rewards"]["hangs"]["state"] == "stuck"
            assert info["rewards"]["mean"]["state"] == "ok"
            # while stuck, requests are answered at once, marked; the other reward serves as usual
            started = time.monotonic()
            assert post(srv.port, png_body(1))[1]["status"] == ["stuck"]
            assert time.monotonic() - started < 0.5
            assert post(srv.port, png_body(1), "/score/mean")[1]["status"] == ["ok"]
            # the client: none scored -> an error; some scored -> NaN for the rest, counted in a warning
            with pytest.raises(RewardServerError, match="none of 1 images was scored.*stuck"):
                remote(srv.url, max_retries=0)(torch.zeros(1, 3, 8, 8), ["x"])
        finally:
            release.set()
        assert wait_for(lambda: health(srv.port)["rewards"]["hangs"]["state"] == "ok", 5)
        release.clear()
        with caplog.at_level(logging.WARNING, logger="rlcm_exp.rewards.remote"):
            client = remote(srv.url, max_retries=0, max_images_per_request=4)
            try:
                scores = client(torch.full((4, 3, 8, 8), 0.2), ["a", "b", "hang", "c"])
            finally:
                release.set()
        assert scores[:2] == pytest.approx(torch.tensor([0.2, 0.2]), abs=1e-2)
        assert bool(scores[2:].isnan().all())
        assert "2 of 4 images not scored (timeout)" in caplog.text


def exits(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    if "exit" in prompts:
        sys.exit(3)
    return images.mean(dim=(1, 2, 3))


def test_a_reward_calling_sys_exit_is_answered_as_an_error_and_the_server_goes_on():
    with running({"exits": exits}) as srv:
        for _ in range(2):
            status, answer = post(srv.port, png_body(1, ["exit"]))
            assert status == 500 and "SystemExit" in answer["error"]
            assert post(srv.port, png_body(1))[0] == 200
        assert health(srv.port)["rewards"]["exits"]["state"] == "ok"


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # the worker dies on purpose
def test_a_dead_worker_is_answered_at_once_and_health_says_dead():
    with running({"mean": mean, "other": mean}) as srv:
        batcher = srv.server.RequestHandlerClass.rewards["mean"].batcher  # type: ignore[attr-defined]

        def die(batch: list) -> None:
            raise SystemExit  # outside the reward call: ends the worker thread

        batcher._run = die
        status, answer = post(srv.port, png_body(2))
        assert status == 200 and answer["status"] == ["dead", "dead"]
        info = health(srv.port)
        assert info["status"] == "dead" and info["rewards"]["mean"]["state"] == "dead"
        assert info["rewards"]["other"]["state"] == "ok"
        assert post(srv.port, png_body(1), "/score/other")[1]["status"] == ["ok"]


# ----------------------------------------------------------------------------- settings and token


@pytest.mark.parametrize(
    ("arg", "key"),
    [
        ("reward_timeout_s=inf", "reward_timeout_s"),
        ("request_timeout_s=nan", "request_timeout_s"),
        ("request_timeout_s=0", "request_timeout_s"),
        ("min_upload_kb_s=-1", "min_upload_kb_s"),
        ("max_connections=0", "max_connections"),
        ("max_connections=1.5", "max_connections"),
        ("max_wait_ms=1e9", "max_wait_ms"),
        ("max_request_mb=inf", "max_request_mb"),
        ("port=70000", "port"),
    ],
)
def test_every_setting_is_typed_and_bounded_with_a_one_line_error(arg, key, capsys):
    assert reward_server.main(["reward=jpeg_compressibility", arg]) == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_more_connections_than_open_files_allow_is_refused_naming_max_connections():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        pytest.skip("no hard limit on open files within max_connections' range here")
    with pytest.raises(ConfigError, match=r"max_connections=.*ulimit -Hn"):
        ServerOptions(max_connections=hard).ensure_file_limit()  # needs hard + 64


def test_a_latin_1_token_works_end_to_end_and_a_wrong_one_is_refused():
    with running({"mean": mean}, token="caf\xe9-\xa7-1") as srv:
        assert remote(srv.url, token="caf\xe9-\xa7-1", max_retries=0)(
            torch.zeros(1, 3, 8, 8), ["x"]
        ).tolist() == [0]
        with pytest.raises(RewardServerError, match="HTTP 401"):
            remote(srv.url, token="cafe-\xa7-1", max_retries=0)(torch.zeros(1, 3, 8, 8), ["x"])


@pytest.mark.parametrize(
    ("arg", "env", "message"),
    [
        ("token=", "", "empty"),
        ("token=caf\u20ac", "", "Latin-1"),
        ("token=a b", "", "spaces"),
        ("port=0", "   ", "empty"),  # a token of spaces in $RLCM_REWARD_TOKEN
    ],
)
def test_an_empty_or_unsendable_token_is_refused_at_start(arg, env, message, capsys, monkeypatch):
    monkeypatch.setenv("RLCM_REWARD_TOKEN", env)
    assert reward_server.main(["reward=jpeg_compressibility", arg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: reward_server token") and message in err[0]

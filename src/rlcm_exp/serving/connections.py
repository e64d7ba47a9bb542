"""Connections that cannot starve the server: a cap on open connections (the excess answered 503 and
closed by the accepting thread, no handler thread started), and reads under a whole-request deadline
with a minimum upload rate (slow or idle clients are dropped)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

_REFUSED_DRAIN = 1 << 16  # bytes of an excess connection's request read (without waiting) before closing
# accept() errors that mean "out of descriptors or memory": retried after a pause, not at once
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_PAUSE_S = 0.1


class DeadlineReader(io.RawIOBase):
    """A socket's reading side where each read waits only until the request's deadline.

    `begin(grace_s)` starts a request: until `body(rate)` its headers must arrive within grace_s;
    after it, the first n body bytes must arrive within grace_s + n / rate seconds of the start (a
    minimum upload rate, with grace_s of slack). A read past the deadline raises TimeoutError.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.start = time.monotonic()
        self.grace_s = math.inf
        self.rate = math.inf  # bytes per second the body must keep up with (inf: no extra time)
        self.count = 0  # body bytes received since `body`

    def readable(self) -> bool:
        return True

    def begin(self, grace_s: float) -> None:
        self.start, self.grace_s, self.rate, self.count = time.monotonic(), grace_s, math.inf, 0

    def body(self, rate: float) -> None:
        self.rate, self.count = rate, 0

    def deadline(self) -> float:
        return self.start + self.grace_s + self.count / self.rate

    def readinto(self, buffer: Any) -> int:
        left = self.deadline() - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline (too slow)")
        self.sock.settimeout(left)
        n = self.sock.recv_into(buffer)
        self.count += n
        return n


def refusal(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer {"error": message} that closes the connection."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class CappedServer(ThreadingHTTPServer):
    """A threading HTTP server holding at most `max_connections` connections (one thread each).

    An excess connection is answered 503 by the accepting thread without blocking (the answer fits
    in the socket's send buffer) and closed; a well-behaved client retries. When accept() fails for
    lack of descriptors the loop pauses instead of spinning on the still-readable listening socket.
    """

    daemon_threads = True  # a stalled client's thread never keeps the process alive
    request_queue_size = 128  # listen backlog (the stdlib's 5 resets a burst of concurrent clients)
    max_connections = 256  # set from ServerOptions by `serve`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0
        self._count_lock = threading.Lock()
        self.refused = 0  # connections answered 503 for being over max_connections

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            return super().get_request()
        except OSError as err:
            if err.errno in _ACCEPT_PAUSE_ERRNOS:
                time.sleep(ACCEPT_PAUSE_S)
            raise

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._count_lock:
            full = self.open_connections >= self.max_connections
            if not full:
                self.open_connections += 1
        if full:
            self.refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # the thread did not start: the slot is free again
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.open_connections -= 1

    def _refuse(self, sock: socket.socket) -> None:
        """503 and close, never blocking the accepting thread: what the client already sent is read
        (so closing does not reset the answer away), and nothing is waited for."""
        answer = refusal(
            503,
            "Service Unavailable",
            f"server busy: max_connections={self.max_connections} connections are open; retry later",
        )
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(answer)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(_REFUSED_DRAIN)
        sock.close()

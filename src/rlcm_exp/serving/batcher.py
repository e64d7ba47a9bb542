"""Merging concurrent score requests into reward calls of up to max_batch images, and the budgets
that bound what requests waiting for the reward may hold in memory."""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from rlcm_exp.rewards.base import RewardFn, as_reward_dict


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None


class Budget:
    """Units (body bytes, decoded pixels) that requests reserve before they hold that much memory and
    release when done, so that all requests together never hold more than `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        """Reserve n units, waiting up to `timeout` seconds for others to release; False if not
        reserved (n alone is over the limit, or the wait timed out)."""
        if n > self.limit:
            return False
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.limit, timeout):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class Batcher:
    """One worker thread runs the reward; request threads queue jobs and wait on them.

    The worker takes the oldest job, then keeps taking queued jobs of the same image size while
    the merged batch stays within max_batch and max_wait_ms has not passed; a job that does not
    fit waits for the next round. One reward call at a time also bounds accelerator memory.

    `pixels` bounds the decoded images of all requests from decoding until their scores are sent
    (queued, being scored, or waiting for their answer): the server reserves a request's pixels
    there before decoding it (server.py, RewardHandler._score).
    """

    def __init__(
        self, reward: RewardFn, max_batch: int, max_wait_ms: float, max_queue_pixels: int | None = None
    ) -> None:
        self.reward = reward
        self.pixels = Budget(sys.maxsize if max_queue_pixels is None else max_queue_pixels)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.calls = 0  # reward calls so far (for /health and tests of merging)
        self._held: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def score(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{"reward": (n,), <component>: (n,)} float32 CPU for one request; blocks until scored."""
        job = _Job(images, prompts)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return (
                self.jobs.get(timeout=timeout) if timeout is None or timeout > 0 else self.jobs.get_nowait()
            )
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            assert first is not None
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait_s
            while count < self.max_batch:
                job = self._next(deadline - time.monotonic())
                if job is None:
                    break
                if (
                    job.images.shape[-2:] != first.images.shape[-2:]
                    or count + len(job.images) > self.max_batch
                ):
                    self._held = job  # scored first in the next round
                    break
                batch.append(job)
                count += len(job.images)
            self._run(batch)
            # hold no scored images while waiting for the next request: they left the pixel budget
            batch.clear()
            first = job = None

    def _run(self, batch: list[_Job]) -> None:
        try:
            images = torch.cat([j.images for j in batch])
            prompts = [p for j in batch for p in j.prompts]
            parts = []
            for i in range(0, len(images), self.max_batch):  # a single job may exceed max_batch
                self.calls += 1
                chunk = images[i : i + self.max_batch]
                parts.append(as_reward_dict(self.reward(chunk, prompts[i : i + self.max_batch]), len(chunk)))
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            start = 0
            for job in batch:
                n = len(job.images)
                job.result = {k: v[start : start + n] for k, v in merged.items()}
                start += n
        except BaseException as err:  # handed to every waiting request, which answers 500
            for job in batch:
                job.error = err
        finally:
            for job in batch:
                job.done.set()

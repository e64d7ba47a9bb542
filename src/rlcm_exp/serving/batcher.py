"""Merging concurrent score requests into reward calls of up to max_batch images, and the budgets
that bound what requests waiting for the reward may hold in memory."""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from rlcm_exp.rewards.base import RewardFn, as_reward_dict

OK = "ok"  # the reward scored the item
TIMEOUT = "timeout"  # the reward call holding the item ran past reward_timeout_s
STUCK = "stuck"  # not scored: a call of this reward has been running past reward_timeout_s
DEAD = "dead"  # not scored: the reward's worker thread has ended
_POLL_S = 1.0  # longest a waiting request sleeps before looking at the reward's state again


class RewardCrashed(Exception):
    """The reward raised SystemExit, KeyboardInterrupt or another non-Exception BaseException."""


@dataclass
class _Job:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    started: bool = False  # its reward call has begun
    parts: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)  # (first item, scores)
    error: BaseException | None = None


@dataclass
class Scored:
    """One request's scores: {"reward": (n,), <component>: (n,)} float32 CPU (NaN where not scored)
    and each item's status (OK, TIMEOUT, STUCK or DEAD)."""

    scores: dict[str, torch.Tensor]
    status: list[str]


def assemble(n: int, parts: list[tuple[int, dict[str, torch.Tensor]]], missing: str) -> Scored:
    """The scores of n items from the parts scored so far; items in no part are NaN, marked `missing`."""
    keys = list(parts[0][1]) if parts else ["reward"]
    scores = {k: torch.full((n,), float("nan")) for k in keys}
    status = [missing] * n
    for offset, part in parts:
        end = offset + len(part["reward"])
        for k in keys:
            scores[k][offset:end] = part.get(k, torch.tensor(float("nan")))
        status[offset:end] = [OK] * (end - offset)
    return Scored(scores, status)


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
    there before decoding it (server.py, RewardHandler._score). Several batchers may share one.

    A call running past `timeout_s` makes the reward "stuck": its waiting requests, the queued ones
    and new ones are answered at once with their unscored items marked (they are not retried: the
    call may never return, and a thread cannot be stopped). When the call returns it is "ok" again.
    A worker thread that ended makes it "dead" for good.
    """

    def __init__(
        self,
        reward: RewardFn,
        max_batch: int,
        max_wait_ms: float,
        max_queue_pixels: int | None = None,
        timeout_s: float = math.inf,
        pixels: Budget | None = None,
    ) -> None:
        self.reward = reward
        limit = sys.maxsize if max_queue_pixels is None else max_queue_pixels
        self.pixels = pixels if pixels is not None else Budget(limit)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.timeout_s = timeout_s
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.calls = 0  # reward calls so far (for /health and tests of merging)
        self._call_started: float | None = None  # monotonic start of the running call, None when idle
        self._held: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def state(self) -> str:
        """OK, STUCK (a call has run past timeout_s) or DEAD (the worker thread has ended)."""
        if not self._thread.is_alive():
            return DEAD
        started = self._call_started
        return STUCK if started is not None and time.monotonic() - started > self.timeout_s else OK

    def score(self, images: torch.Tensor, prompts: list[str]) -> Scored:
        """One request's scores; blocks until scored, or until the reward is stuck or dead (then the
        unscored items are marked). RewardCrashed/the reward's exception if it raised."""
        if (state := self.state()) != OK:
            return assemble(len(images), [], state)
        job = _Job(images, prompts)
        self.jobs.put(job)
        while not job.done.wait(self._poll_s()):
            if (state := self.state()) != OK:
                return assemble(
                    len(images), list(job.parts), TIMEOUT if job.started and state == STUCK else state
                )
        if job.error is not None:
            if not isinstance(job.error, Exception):
                raise RewardCrashed(f"{type(job.error).__name__}: {job.error}") from job.error
            raise job.error
        return assemble(len(images), job.parts, TIMEOUT)

    def _poll_s(self) -> float:
        """Seconds until the running call would become stuck (so a waiter looks again just then)."""
        started = self._call_started
        until = _POLL_S if started is None else started + self.timeout_s - time.monotonic() + 0.01
        return min(_POLL_S, max(0.01, until))

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
        """Score the batch in calls of up to max_batch images, handing each job its part of every
        call as soon as it returns (so a later call that hangs leaves the earlier items scored)."""
        try:
            for job in batch:
                job.started = True
            images = torch.cat([j.images for j in batch])
            prompts = [p for j in batch for p in j.prompts]
            starts = [sum(len(j.images) for j in batch[:i]) for i in range(len(batch))]
            for i in range(0, len(images), self.max_batch):  # a single job may exceed max_batch
                self.calls += 1
                chunk = images[i : i + self.max_batch]
                self._call_started = time.monotonic()
                part = as_reward_dict(self.reward(chunk, prompts[i : i + self.max_batch]), len(chunk))
                self._call_started = None
                for job, first in zip(batch, starts, strict=True):
                    low, high = max(i, first), min(i + len(chunk), first + len(job.images))
                    if low < high:
                        job.parts.append((low - first, {k: v[low - i : high - i] for k, v in part.items()}))
        except BaseException as err:  # handed to every waiting request, which answers 500
            for job in batch:
                job.error = err
        finally:
            self._call_started = None
            for job in batch:
                job.done.set()

"""A reward call that cannot hang a run: each call runs on a daemon thread and the caller waits at
most `timeout_s` (train.reward_timeout_s) for it. The wait is interruptible by signals (SIGTERM's
handler runs while the caller waits), and a call that never returns is left behind on its daemon
thread, which never holds up the process's exit."""

from __future__ import annotations

import threading
from typing import Any

import torch

from rlcm_exp.errors import RunStopped
from rlcm_exp.rewards.base import RewardFn, RewardOutput


class RewardTimeout(RunStopped):
    """A reward call ran past train.reward_timeout_s."""


class TimedReward:
    """`reward_fn` with each call bounded by `timeout_s` seconds (None: no bound, but the wait still
    lets signal handlers run); exceptions of the call are raised in the caller."""

    def __init__(
        self, reward_fn: RewardFn, timeout_s: float | None, key: str = "train.reward_timeout_s"
    ) -> None:
        self.reward_fn, self.timeout_s, self.key = reward_fn, timeout_s, key

    def __call__(self, images: torch.Tensor, prompts: list[str], /) -> RewardOutput:
        box: dict[str, Any] = {}
        done = threading.Event()

        def call() -> None:
            try:
                box["out"] = self.reward_fn(images, prompts)
            except BaseException as err:  # re-raised in the caller, whatever it is
                box["err"] = err
            finally:
                done.set()

        threading.Thread(target=call, name="reward-call", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise RewardTimeout(
                f"the reward gave no answer for {len(prompts)} image(s) within {self.key}={self.timeout_s:g} s "
                "(hung, or far slower than expected); raise the key, or fix the reward"
            )
        if "err" in box:
            raise box["err"]
        return box["out"]  # type: ignore[no-any-return]

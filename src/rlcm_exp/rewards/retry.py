"""How a reward that asks a server over HTTP retries: the keywords the reward-server client
(rewards/remote.py) and the VLM judge (rewards/vlm_judge.py) share, declared once, and their backoff."""

from __future__ import annotations

from typing import TypedDict

from rlcm_exp.rewards.base import check_declared


class RetryPolicy(TypedDict, total=False):
    """A server-backed reward's timeout and retries. Builders accept them as
    `**retry: Unpack[RetryPolicy]` and read them with `retry_settings`."""

    timeout_s: float  # reward.timeout_s: seconds one request may take; the default is the builder's
    max_retries: int  # reward.max_retries: retries of a retryable failure before the run stops (default 3)
    backoff_s: float  # reward.backoff_s: seconds before the first retry, doubled at each next one (default 2)
    max_backoff_s: float  # reward.max_backoff_s: the longest wait between two attempts, seconds (default 60)


def retry_settings(retry: RetryPolicy, timeout_s: float) -> tuple[float, int, float, float]:
    """(timeout_s, max_retries, backoff_s, max_backoff_s) from a builder's retry keywords, `timeout_s`
    being the builder's default. A keyword that is not a RetryPolicy key is a ConfigError naming it."""
    check_declared(retry, RetryPolicy, "retry")
    return (
        retry.get("timeout_s", timeout_s),
        retry.get("max_retries", 3),
        retry.get("backoff_s", 2.0),
        retry.get("max_backoff_s", 60.0),
    )


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """Seconds to wait after failed attempt `attempt` (1, 2, ...): backoff_s doubled per attempt, at most max_backoff_s."""
    return min(max_backoff_s, backoff_s * 2 ** (attempt - 1))

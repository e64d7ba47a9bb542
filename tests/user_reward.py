"""A user's own reward, as the README shows: a plain function of (images, prompts)."""

import torch


def mean_red(images: torch.Tensor, prompts: list[str], weight: float = 1.0) -> torch.Tensor:
    return weight * images[:, 0].mean(dim=(1, 2)).cpu()


def crashing(images: torch.Tensor, prompts: list[str], token: str = "", url: str = "") -> torch.Tensor:
    """A reward that fails as a bug would (not bad input): the run ends in a traceback."""
    raise RuntimeError("the scorer crashed")


def returns(images: torch.Tensor, prompts: list[str], kind: str = "none") -> object:
    """A reward that breaks the contract as `kind` says: none, string, strings, matrix (the wrong
    shape), dict_none."""
    n = len(prompts)
    return {
        "none": None,
        "string": "0.5",
        "strings": ["good"] * n,
        "matrix": torch.zeros(n, 3),
        "dict_none": {"reward": None},
    }[kind]


def fails_on_rank(
    images: torch.Tensor, prompts: list[str], rank: int = 1, after_calls: int = 1
) -> torch.Tensor:
    """A reward (a server, say) that breaks on one process after `after_calls` batches: the rank-failure test."""
    import os

    calls = fails_on_rank.__dict__.setdefault("calls", [0])
    calls[0] += 1
    if int(os.environ.get("RANK", "0")) == rank and calls[0] > after_calls:
        raise RuntimeError(f"reward server unreachable (injected on rank {rank})")
    return images.mean(dim=(1, 2, 3)).cpu()


CALLS = {"n": 0}


def hangs(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """mean_red, but the call after RLCM_TEST_HANG_AFTER calls (env; unset: never) hangs for
    RLCM_TEST_HANG_S seconds (default an hour), first touching the file RLCM_TEST_HANG_MARK if set."""
    import os
    import time
    from pathlib import Path

    after = os.environ.get("RLCM_TEST_HANG_AFTER")
    CALLS["n"] += 1
    if after is not None and CALLS["n"] > int(after):
        if os.environ.get("RLCM_TEST_HANG_MARK"):
            Path(os.environ["RLCM_TEST_HANG_MARK"]).touch()
        time.sleep(float(os.environ.get("RLCM_TEST_HANG_S", "3600")))
    return mean_red(images, prompts)

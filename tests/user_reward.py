"""A user's own reward, as the README shows: a plain function of (images, prompts)."""

import torch


def mean_red(images: torch.Tensor, prompts: list[str], weight: float = 1.0) -> torch.Tensor:
    return weight * images[:, 0].mean(dim=(1, 2)).cpu()


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

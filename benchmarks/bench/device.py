"""Whether a CUDA device runs the benchmark, and waiting for it before a host clock is read."""

from __future__ import annotations

import torch


def cuda_available() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for the device, so that a host clock read after it covers the queued work."""
    if cuda_available():
        torch.cuda.synchronize()

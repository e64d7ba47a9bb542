"""The machine, device and software a benchmark ran on (recorded next to its numbers)."""

from __future__ import annotations

import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench.device import cuda_available
from rlcm_exp.provenance import git_commit

# torch.__version__ carries the CUDA build (+cu130); the others as installed
# torch.__version__ carries the CUDA build (+cu130); the others as installed
VERSIONED = ("diffusers", "transformers", "accelerate", "peft", "numpy")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict[str, Any]:
    """Machine, device, versions and thread settings; call it before any model runs, so that the load
    average says whether the CPU was free."""
    device: dict[str, Any] = {"type": "cuda" if cuda_available() else "cpu"}
    if cuda_available():
        props = torch.cuda.get_device_properties(0)
        device.update(name=props.name, memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "memory_bytes": _memory_bytes(),
            "load_average_at_start": os.getloadavg(),
            "hostname": platform.node(),
        },
        "device": device,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            **{name: version(name) for name in VERSIONED},
            "rlcm_exp_commit": git_commit(),
        },
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "HF_HUB_OFFLINE")},
    }

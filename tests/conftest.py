"""Tests run offline on a CPU: no hub, no wandb cloud, tiny models built into a per-session cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the models here are tiny, and on a 2-core CI machine two OpenMP
# threads contend with the reward thread and with the second process of multi-process tests
# (the toy learning tests ran 2x slower with 2 threads than with 1, with identical results).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_cache"))
    os.environ["RLCM_EXP_CACHE"] = path  # subprocess runs with model=tiny reuse the same folders
    return path


@pytest.fixture(scope="session")
def tiny_family(tiny_cache: str):
    from rlcm_exp.models import tiny_family as build

    return build(tiny_cache)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

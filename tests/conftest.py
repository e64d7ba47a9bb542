"""Tests run offline on a CPU: no hub, no wandb cloud, tiny models built into a per-session cache."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

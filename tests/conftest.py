"""Tests run offline on a CPU: no hub, no wandb cloud, tiny models built into a per-session cache.

Tiers (markers declared in pyproject.toml): `make test-fast` leaves out `slow` (over a minute: the
learning tests, the README's toy runs) and `subprocess` (a process of its own: the real CLI, most
runs forked from a per-test-process server that imported the package once, helpers.Entry; a server,
torchrun); `make test` runs everything but `gpu`, `hub` and `long` (the README's 10+ minute
sweep), on two pytest-xdist workers (`-n 2 --dist loadgroup`). Under xdist, see pytest_collection_modifyitems for what shares a worker.
Shared helpers are in tests/helpers.py; test modules never import one another.
"""

from __future__ import annotations

import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process: the models here are tiny, and on a 2-core CI machine two OpenMP
# threads contend with the reward thread and with the second process of multi-process tests
# (the toy learning tests ran 2x slower with 2 threads than with 1, with identical results).
os.environ.setdefault("OMP_NUM_THREADS", "1")
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set by pytest-xdist in its workers
if XDIST_WORKER:  # one core per worker, whatever the caller's environment says
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup`: a test with an explicit xdist_group keeps it; a slow test is a unit of
    its own (the learning tests spread over both workers); every other test is grouped with its
    module, so module-scoped fixtures (a reference run, a server) are built once, on one worker.
    Slow tests are moved first (with `--no-loadscope-reorder` units start in this order), so no
    several-minute test starts last while the other worker idles."""
    for item in items:
        if not any(item.iter_markers("xdist_group")) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: slow ones first


def pytest_collection_finish(session: pytest.Session) -> None:
    """xdist marks a grouped test by a node-id suffix, which pytest 9.2 ignores (pytest-xdist#1386):
    say so rather than let module fixtures silently run on both workers (pyproject pins pytest < 9.2)."""
    if (
        getattr(session.config.option, "loadgroup", False)
        and session.items
        and not any("@" in i.nodeid for i in session.items)
    ):
        warnings.warn(
            "--dist loadgroup: xdist_group marks were not applied (pytest-xdist#1386)", stacklevel=1
        )


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

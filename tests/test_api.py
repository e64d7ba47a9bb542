"""The Python API: a two-epoch tiny job returns its records, they read back, the trained policy
samples; importing rlcm_exp stays cheap; an export's model card is a Hugging Face model card."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlcm_exp

from .helpers import SMALL


@pytest.fixture(scope="module")
def api_run(tiny_cache, tmp_path_factory) -> tuple[Path, list[dict]]:
    run_dir = tmp_path_factory.mktemp("api") / "run"
    records = rlcm_exp.run([*SMALL, "train.epochs=2", "optimizer.lr=0.05"], run_dir=run_dir)
    return run_dir, records


def test_run_returns_the_records_and_read_records_reads_them(api_run) -> None:
    run_dir, records = api_run
    assert [r["epoch"] for r in records] == [0, 1] and records[-1]["reward_queries"] == 32
    rec = rlcm_exp.read_records(run_dir)
    assert rec["metrics"] == records
    assert [e["epochs_done"] for e in rec["evals"]] == [0, 2]
    assert rec["config"]["task"]["name"] == "compression" and rec["config"]["train"]["epochs"] == 2


def test_load_policy_samples_with_the_trained_lora(api_run) -> None:
    run_dir, _ = api_run
    policy = rlcm_exp.load_policy(run_dir)
    images = policy.sample(["a red cat"], [torch.Generator().manual_seed(0)]).images
    assert images.shape[0] == 1 and images.shape[1] == 3 and torch.isfinite(images).all()
    assert "default_0" in policy.denoiser.peft_config  # the trained LoRA is loaded


def test_model_card_is_a_hugging_face_card(api_run, tmp_path) -> None:
    from huggingface_hub import ModelCard

    from rlcm_exp.evaluation.export import export

    run_dir, _ = api_run
    card = ModelCard.load(export(run_dir, "lora", out=tmp_path / "lora") / "README.md")
    assert card.data.base_model and card.data.library_name == "diffusers"
    assert {"rlcm-exp", "rlcm", "task-compression", "lora"} <= set(card.data.tags)
    assert "python -m rlcm_exp model=tiny task=compression" in card.text  # the training command
    assert "jpeg" in card.text.lower()  # the reward


@pytest.mark.subprocess
def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, rlcm_exp; assert callable(rlcm_exp.run); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

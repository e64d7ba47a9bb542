"""`make gpu-check` at CPU scale: the whole path (random members in the hub layout, the aesthetic
reward's CLIP + head from local paths, RLCM and DDPO rounds through the production `train` in two
variants, the flow rows (SD3.5-Medium Flow-GRPO, SD3.5-Large-Turbo few-step) on the tiny SD3.5
members, the report) runs, and its JSON and markdown carry what benchmarks/README.md documents.
Never a time is asserted."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.bench.gpu_plan import FLOW_ROUNDS, REFERENCE_GPUS, VARIANTS, paper_settings, round_scale

from .helpers import run_entry

REPO = Path(__file__).resolve().parents[1]
PHASES = {"sampling", "reward_wait", "training", "optimizer", "other"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # its own process, forked from one that imported torch and the package (helpers.Entry)
    args = ["--cpu-scale", "--out", str(out)]
    proc = run_entry(args, env, module="benchmarks.bench.gpu_check", cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu-cpu.json").read_text()), out


def test_paper_settings_per_gpu() -> None:
    for algo, tasks in REFERENCE_GPUS.items():
        for task in tasks:
            s = paper_settings(algo, task)
            assert (
                s.per_gpu_samples % s.sample_batch_size == 0 and s.per_gpu_samples % s.train_batch_size == 0
            )
            assert s.per_gpu_samples % s.per_gpu_samples_per_step == 0
            assert s.resolution == (768 if algo == "rlcm" else 512)
            assert all(f >= 1 for f in round_scale(s).values())
    # RLCM aesthetic: 32 trajectories over 4 GPUs = one batch of 8 per GPU; DDPO: 256 / 8 = 4 batches of 8
    assert paper_settings("rlcm", "aesthetic").per_gpu_samples == 8
    assert paper_settings("ddpo", "aesthetic").per_gpu_samples == 32


@pytest.mark.subprocess
def test_report_fields(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["scale"] == "cpu-scale" and data["device_slug"] == "cpu"
    runs = data["runs"]
    flow = [r for r in runs if "architecture" in r["settings"]]  # the flow rows (issue 28)
    assert {(r["settings"]["algo"], r["variant"]["name"]) for r in runs if r not in flow} == {
        (a, v.name) for a in ("rlcm", "ddpo") for v in VARIANTS[:2]
    }
    assert [(r["settings"]["task"], r["settings"]["sampler"]) for r in flow] == [
        (row[0], row[2]) for row in FLOW_ROUNDS
    ]
    for r in runs:
        assert r["status"] == "ok", r
        assert set(r["measured"]["phases"]) == PHASES and r["measured"]["round_s"] > 0
        assert set(r["per_gpu_round"]) == PHASES | {"round_s"} and r["per_gpu_round"]["round_s"] > 0
        assert r["peak_memory"]["bytes"] > 0 and r["rollout_s"] > 0
        assert r["flops"]["train_round"] > 0 and r["flops"]["sampling_round"] > 0
        for kind in ("training", "sampling", "round"):
            assert r["mfu"][kind]["measured_matmul"] > 0
        plan, v = r["batch_plan"], r["variant"]
        per_call = v["transitions_per_forward"] or plan["trained_transitions"]
        assert plan["transitions_per_forward"] == per_call
        # CFG doubles DDPO's training batch, and SD3's under guidance (the Flow-GRPO row)
        guided_flow = r in flow and r["settings"]["guidance_scale"] > 1
        cfg_factor = 2 if r["settings"]["algo"] == "ddpo" or guided_flow else 1
        assert r["unet_batches"]["train"] == plan["train_batch_size"] * per_call * cfg_factor
        # the correctness monitors: fp32 on a CPU, so the first ratios are 1 and nothing clips on the first call
        m = r["monitors"]
        assert m["ratio_first_max_dev"] < 1e-4 and m["clipfrac_first_call"] == 0.0, m
    assert {q["variant"] for q in data["ratios"]} == {v.name for v in VARIANTS[:2]}
    for q in data["ratios"]:
        assert q["rollout_ratio_rlcm_to_ddpo"] > 0 and q["round_ratio_rlcm_to_ddpo"] > 0


@pytest.mark.subprocess
def test_markdown_table(report: tuple[dict, Path]) -> None:
    _, out = report
    table = (out / "gpu-cpu.md").read_text()
    assert "| task | algo | per-GPU shape | variant | status | peak GiB | round s |" in table
    assert "| task | variant | RLCM:DDPO rollout | RLCM:DDPO round |" in table
    assert "ratio_first_max_dev / clipfrac first call / round |" in table
    assert table.count("| aesthetic | RLCM |") == 2 and table.count("| aesthetic | DDPO |") == 2


def test_no_gpu_without_cpu_scale_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from benchmarks.bench.gpu_check import main

    assert main(["--out", "/nonexistent"]) == 2
    assert "--cpu-scale" in capsys.readouterr().err


@pytest.mark.subprocess  # a child process, and the benchmark's imports
def test_a_child_run_past_its_timeout_is_killed_and_recorded(tmp_path) -> None:
    from benchmarks.bench.gpu_check import _run_one

    spec = {"algo": "rlcm", "warmup": 0, "overrides": []}
    raw = _run_one(spec, in_process=False, tmp=tmp_path, timeout_s=0.2)
    assert raw["status"] == "timeout" and "--run-timeout-s" in raw["error"]


def test_variants_the_memory_model_refuses_are_skipped_with_its_reason() -> None:
    from benchmarks.bench.gpu_plan import Variant, memory_refusal, run_overrides

    s = paper_settings("ddpo", "aesthetic")  # 50 steps x 4 x CFG 2: 400 images per call with tpf=all

    def overrides(v: Variant) -> list[str]:
        return run_overrides(s, v, Path("/nonexistent"), [], cuda=True, warmup=1)

    why = memory_refusal(overrides(Variant(False, 0)), 80e9)
    assert why is not None and "400 images at 512 px" in why and "transitions_per_forward" in why
    assert memory_refusal(overrides(Variant(False, 1)), 80e9) is None

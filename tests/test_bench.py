"""The benchmark runs end to end at its smallest size and writes what the README promises.

Only the shape of the output is checked: a test never asserts a time (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.bench.__main__ import main as bench_main
from benchmarks.bench.report import update_readme

from .helpers import run_entry

REPO = Path(__file__).resolve().parents[1]
SMALLEST = [
    "--scale",
    "tiny",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--set",
    "sampler.num_steps=3",
    "--set",
    "train.samples_per_epoch=8",
    "--set",
    "train.sample_batch_size=4",
    "--set",
    "train.samples_per_step=8",
    "--compare-transitions-per-forward",
]
PHASES = {
    "text_encode",
    "sampling",
    "vae_decode",
    "reward_wait",
    "advantages",
    "logprob_forward",
    "backward",
    "checkpoint",
    "optimizer",
    "logging",
    "other",
}
FLOOR = {"text_encoder", "unet_sample", "vae_decode", "reward", "unet_train", "optimizer", "total"}


@pytest.fixture(scope="module")
def report(tiny_cache: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*SMALLEST, "--out", str(out), "--readme", str(out / "README.md")]
    # its own process, forked from one that imported torch and the package (helpers.Entry)
    proc = run_entry(args, env, module="benchmarks.bench", cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "tiny-cpu.json").read_text()), out


def _is_spread(s: dict) -> bool:
    return {"median", "min", "max", "n"} <= set(s) and s["min"] <= s["median"] <= s["max"]


@pytest.mark.subprocess
def test_report_has_every_field(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["scale"] == "tiny" and data["repeats"] == 1
    env = data["environment"]
    assert {"torch", "diffusers", "transformers", "accelerate", "python"} <= set(env["versions"])
    assert env["device"]["type"] in {"cpu", "cuda"} and env["machine"]["cpu_count"]
    assert set(data["algos"]) == {"rlcm", "ddpo"}
    for algo in data["algos"].values():
        assert set(algo["phases"]) == PHASES and all(_is_spread(s) for s in algo["phases"].values())
        assert set(algo["floor"]) == FLOOR and algo["floor"]["total"]["median"] > 0
        for key in ("epoch_s", "floor_s", "overhead", "images_per_s", "rollout_s"):
            assert _is_spread(algo[key]) and algo[key]["median"] > 0, key
        assert algo["peak_memory"]["bytes"] > 0 and algo["peak_memory"]["kind"]
        assert algo["flops"]["unet_train_call"] > algo["flops"]["unet_sample_call"] > 0
        assert algo["mfu"]["peak_flops_per_s"] > 0
        assert len(algo["raw"]["epochs"]) == len(algo["raw"]["floors"]) == 1
    # same batch settings, each algorithm with its own sampler
    rlcm, ddpo = data["algos"]["rlcm"], data["algos"]["ddpo"]
    assert rlcm["batch_plan"]["samples_per_epoch"] == ddpo["batch_plan"]["samples_per_epoch"] == 8
    assert (
        rlcm["batch_plan"]["transitions_per_trajectory"] == 2
        and ddpo["batch_plan"]["transitions_per_trajectory"] == 3
    )
    assert data["comparison"]["rollout_ratio_rlcm_to_ddpo"] > 0


@pytest.mark.subprocess
def test_transitions_per_forward_comparison(report: tuple[dict, Path]) -> None:
    """The training phase replayed with 1 and all transitions per UNet call; DDPO's CFG doubles its batches."""
    data, out = report
    for name, algo in data["algos"].items():
        plan, batches = algo["batch_plan"], algo["unet_batches"]
        cfg = 2 if name == "ddpo" else 1
        assert batches["sample"] == plan["sample_batch_size"] * cfg
        assert batches["train"] == batches["train_per_transition"] == plan["train_batch_size"] * cfg
        rows = {r["transitions_per_forward"]: r for r in algo["transitions_compare"]}
        assert set(rows) == {1, 0}
        trained, minibatches = plan["trained_transitions"], plan["minibatches_per_inner_epoch"]
        assert rows[1]["unet_training_calls"] == minibatches * trained and rows[1]["per_call"] == 1
        assert rows[0]["unet_training_calls"] == minibatches and rows[0]["per_call"] == trained
        for row in rows.values():
            assert _is_spread(row["seconds"]) and row["seconds"]["n"] == 1
            assert row["peak_memory"]["bytes"] > 0
    table = (out / "tiny-cpu.md").read_text()
    assert "| | RLCM 1/call | RLCM all/call | DDPO 1/call | DDPO all/call |" in table
    assert "DDPO CFG path: classifier-free guidance" in table


@pytest.mark.subprocess
def test_table_and_readme_block(report: tuple[dict, Path]) -> None:
    _, out = report
    table = (out / "tiny-cpu.md").read_text()
    assert (
        "overhead = epoch / floor" in table and "| phase | RLCM | RLCM floor | DDPO | DDPO floor |" in table
    )
    readme = out / "README.md"
    before = readme.read_text()
    assert before.count("<!-- bench:tiny-cpu:start -->") == 1
    update_readme(readme, "tiny-cpu", table)  # rewriting replaces the block, never appends a second
    assert readme.read_text().count("<!-- bench:tiny-cpu:start -->") == 1


def test_toy_scale_without_weights_is_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import rlcm_exp.toy.family

    monkeypatch.setattr(rlcm_exp.toy.family, "TOY_WEIGHTS", tmp_path / "no_weights")
    assert bench_main(["--scale", "toy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "make toy-model" in err and "--scale tiny" in err and "Traceback" not in err

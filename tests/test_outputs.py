"""What a run and a sweep leave to read: the sweep's results table (numbers recomputed from the
metrics files), an unknown metric refused, held-out evaluation before and after by default, the
labelled before/after grid (the real "before" after a resume too), the before score as a number."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from rlcm_exp.analysis.summary import RunSummary, load_eval_images
from rlcm_exp.compare import main as compare
from rlcm_exp.configs import compose
from rlcm_exp.tracking import read_metrics
from rlcm_exp.training.build import train
from rlcm_exp.training.callbacks import Callback

from .helpers import SMALL


def fake_run(folder: Path, lr: float, seed: int, rewards: list[float], evals: list[float]) -> None:
    folder.mkdir(parents=True)
    cfg = {"algo": {"name": "rlcm"}, "task": {"name": "toy"}, "seed": seed, "optimizer": {"lr": lr}}
    OmegaConf.save(OmegaConf.create({**cfg, "train": {"epochs": len(rewards)}}), folder / "config.yaml")
    rows = [
        {
            "epoch": e,
            "reward_mean": r,
            "wallclock_s": 2.0 * (e + 1) + seed,
            "reward_queries": 16 * (e + 1),
            "gpu_hours": (2.0 * (e + 1) + seed) / 3600,
        }
        for e, r in enumerate(rewards)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    done = [0, len(rewards)]
    lines = [{"epochs_done": d, "eval_reward_mean": v} for d, v in zip(done, evals, strict=True)]
    (folder / "eval.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_sweep_table_recomputed_from_the_metrics_files(tmp_path, capsys) -> None:
    sweep = tmp_path / "multirun"
    curves = {
        (0.01, 0): [0.1, 0.5, 0.4],
        (0.01, 1): [0.2, 0.3, 0.6],
        (0.1, 0): [0.0, 0.2, 0.3],
        (0.1, 1): [0.1, 0.4, 0.2],
    }
    for i, ((lr, seed), rewards) in enumerate(curves.items()):
        fake_run(sweep / f"{i}_lr={lr},seed={seed}", lr, seed, rewards, [0.05 * i, 0.1 * i + 0.3])
    assert compare([str(sweep)]) == 0
    assert "compare.md" in capsys.readouterr().out

    # the default threshold: the lowest final seed-mean of the two groups (lr 0.1: (0.3 + 0.2) / 2)
    threshold = min(np.mean([curves[(lr, s)][-1] for s in (0, 1)]) for lr in (0.01, 0.1))
    rows = list(csv.DictReader((sweep / "compare.csv").open()))
    assert [r["run"] for r in rows] == sorted(p.name for p in sweep.iterdir() if p.is_dir())
    for row in rows:
        metrics = read_metrics(sweep / row["run"] / "metrics.jsonl")
        evals = read_metrics(sweep / row["run"] / "eval.jsonl")
        ys = [m["reward_mean"] for m in metrics]
        assert float(row["final"]) == pytest.approx(ys[-1]) and float(row["best"]) == pytest.approx(max(ys))
        assert int(row["best_epoch"]) == int(np.argmax(ys))
        assert float(row["heldout_before"]) == pytest.approx(evals[0]["eval_reward_mean"])
        assert float(row["heldout_after"]) == pytest.approx(evals[-1]["eval_reward_mean"])
        assert float(row["wallclock_s"]) == pytest.approx(metrics[-1]["wallclock_s"])
        assert float(row["threshold"]) == pytest.approx(threshold)
        reach = next(m for m in metrics if m["reward_mean"] >= threshold)
        assert float(row["wallclock_s_to_threshold"]) == pytest.approx(reach["wallclock_s"])
        assert int(row["reward_queries_to_threshold"]) == reach["reward_queries"]
        # the overrides that differ between the runs, each in its own column
        cfg = OmegaConf.load(sweep / row["run"] / "config.yaml")
        assert float(row["optimizer.lr"]) == cfg.optimizer.lr and int(row["seed"]) == cfg.seed
    md = (sweep / "compare.md").read_text()
    assert f"Threshold {threshold:.6g}" in md and "| optimizer.lr | seeds |" in md

    # a given threshold nobody reaches: '-' in the markdown, empty in the CSV
    assert compare([str(sweep), "--threshold", "9", "--out", str(tmp_path / "hi.png")]) == 0
    assert all(r["wallclock_s_to_threshold"] == "" for r in csv.DictReader((tmp_path / "hi.csv").open()))


def test_unknown_metric_is_refused_with_the_known_ones(tmp_path, capsys) -> None:
    fake_run(tmp_path / "sweep" / "a", 0.1, 0, [0.1, 0.2], [0.0, 0.1])
    assert compare([str(tmp_path / "sweep"), "--metric", "reward_mena"]) == 2
    err = capsys.readouterr().err
    assert "reward_mena" in err and "reward_mean" in err and "wallclock_s" in err
    assert not (tmp_path / "sweep" / "compare.png").exists()


class Recorder(Callback):
    """Keeps the trainer and swaps its logger for one that records what it logs."""

    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []
        self.images: list[str] = []
        self.trainer: Any = None

    def on_fit_start(self, trainer: Any) -> None:
        self.trainer = trainer
        outer = self

        class Logger:
            def log(self, metrics: dict[str, Any], step: int) -> None:
                outer.logged.append(dict(metrics))

            def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int) -> None:
                outer.images.append(key)

            def finish(self) -> None:
                pass

        trainer.logger = Logger()


TINY = [*SMALL, "train.samples_per_epoch=8", "train.samples_per_step=8"]


def test_heldout_before_and_after_by_default_and_after_a_resume(tiny_cache, tmp_path) -> None:
    run = tmp_path / "run"
    first = Recorder()
    train(compose("config", [*TINY, "train.epochs=2"]), run, callbacks=[first, RunSummary()])
    evals = read_metrics(run / "eval.jsonl")
    assert [e["epochs_done"] for e in evals] == [0, 2]  # train.eval_every defaults to train.epochs
    # the score before training reaches the tracker as a number; the eval images too
    before = next(m for m in first.logged if "eval_reward_before" in m)
    assert (
        before["eval_reward_before"] == pytest.approx(evals[0]["eval_reward_mean"]) and before["epoch"] == -1
    )
    assert "eval_samples" in first.images

    # before_after.png: 2 rows x 8 held-out images (4 prompts x 2 seeds), each >= 128 px
    width, height = Image.open(run / "before_after.png").size
    assert width >= 8 * 128 and height >= 2 * 128
    saved = load_eval_images(run / "eval")
    assert saved is not None and saved["epochs_done"] == 0 and len(saved["images"]) == 8
    assert saved["prompts"][:4] == ["bike", "fridge", "waterfall", "tractor"]  # distinct prompts first
    assert (run / "eval" / "epoch_0002.png").is_file()

    summary = RunSummary()  # what the commands attach: the run's grids and its summary figures
    train(compose("config", [*TINY, "train.epochs=3", "resume=auto"]), run, callbacks=[Recorder(), summary])
    grid = summary.images
    assert grid["first"]["epochs_done"] == 0 and grid["last"]["epochs_done"] == 3
    torch.testing.assert_close(grid["first"]["images"], saved["images"])  # the real "before"
    assert (grid["first"]["images"] - grid["last"]["images"]).abs().max() > 0


def test_default_evaluation_changes_no_training_metric(tiny_cache, tmp_path) -> None:
    """Held-out evaluation draws from its own generators: the training records of a fixed-seed run are
    those of the same run without evaluation, plus the evaluation's keys."""
    off = train(compose("config", [*TINY, "train.epochs=2", "train.eval_every=0"]), tmp_path / "off")
    on = train(compose("config", [*TINY, "train.epochs=2"]), tmp_path / "on")
    for a, b in zip(off, on, strict=True):
        timing = {k for k in a if k.startswith("time_") or k in ("wallclock_s", "gpu_hours")}
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing and not k.startswith("eval_") and k != "time_eval_s"
        }
    assert "eval_reward_mean" in on[-1] and "eval_reward_mean" not in off[-1]

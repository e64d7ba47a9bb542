"""The fair-comparison study (conf/study/toy.yaml, reproduction/study*.py): its runs compose, its rule and
statistics by hand, the wall-clock budget end to end, and the report on fabricated runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.utils import save_image

from rlcm_exp import reproduce
from rlcm_exp.analysis.runs import load_run
from rlcm_exp.configs import compose
from rlcm_exp.reproduction import study, study_report, study_stats
from rlcm_exp.reproduction.plan import Outcome
from rlcm_exp.training.build import check_batches
from rlcm_exp.validation import check_before_loading

from .helpers import run_in_process


def fake_selection(s: study.Study) -> dict:
    first = {a: next(iter(s.settings[a])) for a in s.algos}
    return {"chosen": {t: dict(first) for t in s.tasks}, "thresholds": {t: 0.5 for t in s.tasks}}


def test_the_toy_study_gives_both_algorithms_the_same_tuning_budget() -> None:
    s = study.load_study("toy")
    sizes = {a: len(named) for a, named in s.settings.items()}
    assert sizes["rlcm"] == sizes["ddpo"] >= 7  # six grid settings + the paper's
    assert all(study.PAPER in named for named in s.settings.values())
    assert len(s.seeds) >= 3 and s.tune_seed not in s.seeds
    assert set(s.tasks) == {"toy_compression", "toy_incompression", "toy_alignment"}
    tune = study.plan_tuning(s)
    assert len(tune) == len(s.tasks) * (sizes["rlcm"] + sizes["ddpo"])
    assert all(f"train.max_wallclock_s={s.tune_budget_s:g}" in r.overrides for r in tune)


def test_every_study_run_composes_and_passes_the_checks() -> None:
    """Tuning and final runs (with a selection of the first setting) compose, validate and have batch
    arithmetic that holds, before any of them trains."""
    s = study.load_study("toy")
    specs = study.plan_tuning(s) + study.plan_final(s, fake_selection(s), s.seeds[:1])
    for spec in specs:
        cfg = compose("config", list(spec.overrides))
        check_before_loading(cfg)
        check_batches(cfg, 1)
        assert cfg.train.max_wallclock_s in (s.budget_s, s.tune_budget_s)
    paper = next(r for r in specs if r.name == "toy_compression_rlcm_paper_s100")
    cfg = compose("config", list(paper.overrides))
    assert (cfg.sampler.num_steps, cfg.optimizer.lr, cfg.algo.ppo.clip_range) == (8, 1e-4, 1e-4)
    assert cfg.train.samples_per_epoch == cfg.train.samples_per_step == 16  # one step per round
    align = compose(
        "config", list(next(r for r in specs if r.name == "toy_alignment_rlcm_paper_s100").overrides)
    )
    assert align.train.samples_per_epoch == align.train.samples_per_step == 120


def test_final_plan_trains_a_chosen_paper_setting_once_and_the_other_horizons() -> None:
    s = study.load_study("toy")
    sel = {"chosen": {t: {"rlcm": "lr1e-3_h4_w8", "ddpo": study.PAPER} for t in s.tasks}}
    specs = study.plan_final(s, sel, (0, 1, 2))
    names = [r.name for r in specs]
    assert len(names) == len(set(names))
    per_task = len(s.seeds) * (2 + 1)  # RLCM chosen + paper, DDPO paper once
    horizons = [r for r in specs if r.kind == "horizon"]
    assert len(specs) == len(s.tasks) * per_task + len(horizons)
    assert {r.name for r in horizons} == {
        f"toy_compression_rlcm_lr1e-3_h4_w8_h{h}_s{k}" for h in (2, 8) for k in range(3)
    }
    assert all("train.save_images=64" in r.overrides for r in specs)


def test_threshold_rules_and_smoothing_by_hand() -> None:
    assert study.threshold_from_start(-1.0, {"relative": 0.1}) == pytest.approx(-0.9)
    assert study.threshold_from_start(2.0, {"relative": 0.1}) == pytest.approx(2.2)
    assert study.threshold_from_start(0.6, {"gap": 0.25, "max": 1.0}) == pytest.approx(0.7)
    np.testing.assert_allclose(study.smoothed(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert study.first_crossing(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.5, 0.9]), 0.5) == 2.0
    assert study.first_crossing(np.array([1.0]), np.array([0.1]), 0.5) is None


def _run(
    folder: Path, algo: str, task: str, seed: int, rewards: list[float], sec: float, steps: int = 4
) -> Path:
    folder.mkdir(parents=True)
    cfg = {
        "algo": {"name": algo},
        "task": {"name": task},
        "seed": seed,
        "sampler": {"num_steps": steps},
        "train": {"epochs": 1000, "max_wallclock_s": sec * len(rewards), "samples_per_epoch": 16},
    }
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    recs = [
        {
            "epoch": e,
            "reward_mean": r,
            "wallclock_s": (e + 1) * sec,
            "gpu_hours": (e + 1) * sec / 3600,
            "reward_queries": (e + 1) * 16,
            "time_sample_s": sec / 2,
        }
        for e, r in enumerate(rewards)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "checkpoints" / "final").mkdir(parents=True)
    return folder


def test_selection_rule_by_hand(tmp_path: Path) -> None:
    """Least time to the threshold wins; with none reaching it, the highest smoothed final reward."""
    s = study.load_study("toy")
    runs = {}
    rewards = {  # start -1.0 is the best start -> compression threshold -0.9 (relative 0.1)
        "lr1e-3_h4_w8": ([-1.0, -0.95, -0.89, -0.85], 1.0),  # smoothed (3) reaches -0.9 at epoch 3: t = 4
        "lr3e-3_h4_w8": ([-1.0, -0.85, -0.8, -0.8], 2.0),  # smoothed -0.883 at epoch 2: t = 6
        "paper": ([-1.1, -1.0, -1.0, -1.0], 1.0),
    }
    for name, (r, sec) in rewards.items():
        key = f"toy_compression_rlcm_{name}_s{s.tune_seed}"
        runs[key] = load_run(_run(tmp_path / key, "rlcm", "toy_compression", s.tune_seed, r, sec))
    for name, r in {"lr1e-3_s10_cfg1": [-1.2, -1.1, -1.0], "paper": [-1.2, -1.2, -1.2]}.items():
        key = f"toy_compression_ddpo_{name}_s{s.tune_seed}"
        runs[key] = load_run(_run(tmp_path / key, "ddpo", "toy_compression", s.tune_seed, r, 1.0))
    sel = study.select(s, runs)
    assert sel["thresholds"]["toy_compression"] == pytest.approx(-0.9)
    assert sel["chosen"]["toy_compression"] == {"rlcm": "lr1e-3_h4_w8", "ddpo": "lr1e-3_s10_cfg1"}
    times = {(r["algo"], r["setting"]): r["time_to_threshold_s"] for r in sel["rows"]}
    assert times[("rlcm", "lr1e-3_h4_w8")] == pytest.approx(4.0) and times[
        ("rlcm", "lr3e-3_h4_w8")
    ] == pytest.approx(6.0)
    assert times[("ddpo", "lr1e-3_s10_cfg1")] is None


def test_bootstrap_intervals_by_hand() -> None:
    same = study_stats.per_seed_interval([2.0, 2.0, 2.0])
    assert (same.value, same.lo, same.hi) == (2.0, 2.0, 2.0)
    ci = study_stats.per_seed_interval([0.0, 1.0])
    assert ci.value == 0.5 and ci.lo == 0.0 and ci.hi == 1.0  # resamples: {0,0}, {0,1}, {1,1}
    assert study_stats.verdict(study_stats.Interval(3.0, 1.5, 4.0)) == "holds"
    assert study_stats.verdict(study_stats.Interval(0.5, 0.2, 0.9)) == "does not hold"
    assert study_stats.verdict(study_stats.Interval(1.0, 0.5, 1.5)) == "inconclusive at this power"
    lo, hi = study_stats.percentile_interval(np.array([1.0, 2.0, np.inf, np.inf]))
    assert lo == 1.0 and np.isinf(hi)  # "never reached" stays an infinite bound


def test_grid_split_diversity_and_description_by_hand(tmp_path: Path) -> None:
    images = torch.zeros(4, 3, 32, 32)
    images[1] = 1.0  # white
    images[2, 0] = 1.0  # red
    images[3, :, 8:24, 8:24] = 1.0  # a white square on black: 25% foreground
    save_image(images, tmp_path / "g.png", nrow=2)
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"), dtype=np.float64) / 255
    back = study_stats.split_grid(grid, 4)
    np.testing.assert_allclose(back, images.permute(0, 2, 3, 1).numpy(), atol=1 / 255)
    two = back[:2]
    assert study_stats.diversity(two) == pytest.approx(1.0)  # black vs white: RMS distance 1
    desc = study_stats.describe_images(back)
    assert desc["foreground"] == pytest.approx((0 + 0 + 0 + 0.25) / 4)
    assert desc["luminance"] == pytest.approx((0 + 1 + 0.299 + 0.25) / 4, abs=1e-3)


def _grid(folder: Path, epoch: int, value: float) -> None:
    (folder / "samples").mkdir(exist_ok=True)
    images = torch.full((4, 3, 32, 32), value)
    images[:, :, 8:24, 8:24] = 1.0 - value
    save_image(images, folder / "samples" / f"epoch_{epoch:04d}.png", nrow=2)
    (folder / "samples" / f"epoch_{epoch:04d}.txt").write_text("a red circle on blue | 0.1\n" * 4)


def test_report_on_fabricated_runs(tmp_path: Path) -> None:
    """RLCM reaches the threshold in 2 s, DDPO never within its budget: claims, ratios and figures."""
    s = study.load_study("toy")
    s = study.Study(**{**s.__dict__, "tasks": ("toy_compression",), "seeds": (0, 1)})
    sel = {
        "chosen": {"toy_compression": {"rlcm": "lr1e-3_h4_w8", "ddpo": "paper"}},
        "thresholds": {"toy_compression": -0.9},
        "commit": "abc",
    }
    specs = study.plan_final(s, sel, s.seeds)
    for spec in specs:
        steps = int(next(o for o in spec.overrides[::-1] if o.startswith("sampler.num_steps=")).split("=")[1])
        rising = [-1.0, -0.85, -0.8, -0.75] if spec.algo == "rlcm" else [-1.0, -0.98, -0.97, -0.96]
        folder = _run(tmp_path / "runs" / spec.name, spec.algo, spec.task, spec.seed, rising, 1.0, steps)
        _grid(folder, 0, 0.2)
        _grid(folder, 3, 0.4 + 0.01 * spec.seed)
    path = study_report.write(
        tmp_path, s, sel, specs, Outcome(), [], "python -m rlcm_exp.reproduce --scale toy", 1.0
    )
    text = path.read_text()
    assert "## Claims" in text and "RLCM trains 17x faster" in text
    data = json.loads((tmp_path / "report.json").read_text())
    tuned = next(r for r in data["ratios"] if r["variant"] == "tuned")
    assert tuned["wallclock"]["bound"] == ">="  # DDPO never reached -0.9: censored at its last time
    assert tuned["wallclock"]["value"] == pytest.approx(4.0 / 3.0)  # DDPO 4 s (all) / RLCM 3 s
    rlcm = next(r for r in data["rows"] if r["algo"] == "rlcm" and r["variant"] == "tuned")
    assert rlcm["time_to_threshold_s"]["value"] == pytest.approx(3.0)  # smoothed (3): -0.883 at epoch 2
    for fig in (
        "fig4_reward_vs_queries.png",
        "fig5_reward_vs_gpu_hours.png",
        "fig7_horizon.png",
        "samples_toy_compression.png",
    ):
        assert (tmp_path / fig).stat().st_size > 1000, fig
    assert "after training its images were brighter" in text  # the fabricated backgrounds got brighter


def test_reproduce_study_dry_run_and_missing_selection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert reproduce.main(["--scale", "toy-tune", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "42 training runs" in capsys.readouterr().out
    assert reproduce.main(["--scale", "toy", "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "selection.json does not exist" in err and "SCALE=toy-tune" in err


def test_wallclock_budget_ends_a_run_and_counts_as_finished(tiny_cache: str, tmp_path: Path) -> None:
    """train.max_wallclock_s: the first epoch reaching it is the last; the final LoRA is written and
    the run is finished although train.epochs was not reached."""
    run_dir = tmp_path / "run"
    overrides = [
        "model=tiny",
        "task=compression",
        "train.epochs=50",
        "train.samples_per_epoch=8",
        "train.sample_batch_size=8",
        "train.train_batch_size=4",
        "train.samples_per_step=8",
        "sampler.num_steps=2",
        "train.max_wallclock_s=1e-6",
    ]
    run_in_process(overrides, run_dir)
    run = load_run(run_dir)
    assert len(run.records) == 1 and run.finished
    assert (run_dir / "checkpoints" / "final").is_dir()

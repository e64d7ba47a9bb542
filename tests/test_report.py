"""`python -m rlcm_exp.reproduce --scale smoke`: a two-run sweep end to end, and the report's numbers
recomputed from the metrics files by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from rlcm_exp import reproduce
from rlcm_exp.analysis.runs import find_runs, is_finished, seed_mean_curve, time_to_threshold
from rlcm_exp.analysis.tables import threshold_markdown, threshold_table
from rlcm_exp.configs import compose
from rlcm_exp.reproduction import plan
from rlcm_exp.tracking import read_metrics


def table_rows(markdown: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, [c.strip() for c in line.strip("|").split("|")], strict=True)))
    return rows


def first_reach(xs: list[float], ys: list[float], threshold: float) -> float:
    return next(x for x, y in zip(xs, ys, strict=True) if y >= threshold)


@pytest.mark.subprocess  # each training run a `python -m rlcm_exp` process, two at once
def test_smoke_reproduction_end_to_end(tiny_cache, tmp_path) -> None:
    # two runs at once: the parallel path is the one `make reproduce-paper` takes on a CPU
    args = ["--scale", "smoke", "--seeds", "0", "--figures", "4,5,6", "--out", str(tmp_path), "--jobs", "2"]
    assert reproduce.main(args) == 0
    scale_dir = tmp_path / "smoke"
    report = (scale_dir / "report.md").read_text()
    for fig in ["fig4_reward_vs_queries.png", "fig5_reward_vs_gpu_hours.png", "fig6_inference_budget.png"]:
        assert (scale_dir / fig).stat().st_size > 1000 and f"]({fig})" in report
    assert "torch " in report and "python -m rlcm_exp algo=ddpo task=compression seed=0" in report

    # the table, recomputed from the metrics files alone
    metrics = {
        a: read_metrics(scale_dir / "runs" / f"compression_{a}_s0" / "metrics.jsonl")
        for a in ("rlcm", "ddpo")
    }
    assert all(len(m) == 2 for m in metrics.values())
    finals = {a: m[-1]["reward_mean"] for a, m in metrics.items()}
    threshold = min(finals.values())
    expected = {}
    for algo, m in metrics.items():
        ys = [r["reward_mean"] for r in m]
        expected[algo] = {
            "final": finals[algo],
            "wall": first_reach([r["wallclock_s"] for r in m], ys, threshold),
            "gpu": first_reach([r["gpu_hours"] for r in m], ys, threshold),
        }
    rows = {r["algo"]: r for r in table_rows(report, "| task | algo |")}
    assert set(rows) == {"rlcm", "ddpo"}
    for algo, row in rows.items():
        assert float(row["threshold"]) == pytest.approx(threshold, rel=1e-5)
        assert float(row["final reward (mean +- std)"].split("+-")[0]) == pytest.approx(
            expected[algo]["final"], rel=1e-5
        )
        assert float(row["time to threshold (s)"]) == pytest.approx(expected[algo]["wall"], rel=1e-5)
        assert float(row["GPU-hours to threshold"]) == pytest.approx(expected[algo]["gpu"], rel=1e-5)
    speedup = expected["ddpo"]["gpu"] / expected["rlcm"]["gpu"]
    assert float(rows["rlcm"]["speed-up DDPO/RLCM (GPU-h)"]) == pytest.approx(speedup, rel=1e-4)

    # seconds per epoch by phase, recomputed from the same files
    phases = {r["algo"]: r for r in table_rows(report, "| task | algo | H | epochs (all seeds)")}
    for algo, m in metrics.items():
        row = phases[algo]
        for column, key in [("sampling (s)", "time_sample_s"), ("training (s)", "time_train_s")]:
            assert float(row[column]) == pytest.approx(sum(r[key] for r in m) / len(m), rel=1e-5)
        assert float(row["epoch wall-clock (s)"]) == pytest.approx(m[-1]["wallclock_s"] / len(m), rel=1e-5)
    per_traj = {
        a: float(phases[a]["epoch wall-clock (s)"]) / float(phases[a]["samples/epoch"])
        for a in ("rlcm", "ddpo")
    }
    assert float(phases["rlcm"]["DDPO/RLCM time per trajectory"]) == pytest.approx(
        per_traj["ddpo"] / per_traj["rlcm"], rel=1e-4
    )

    # rollout timing comes from the evaluations written next to each run
    evals = {
        a: json.loads((scale_dir / "runs" / f"compression_{a}_s0" / "eval" / "eval.json").read_text())
        for a in ("rlcm", "ddpo")
    }
    rollout = {r["algo"]: r for r in table_rows(report, "| task | algo | H | s/image")}
    for algo, ev in evals.items():
        own = next(s for s in ev["steps"] if s["num_steps"] == ev["num_steps"])
        assert float(rollout[algo]["s/image (full rollout)"]) == pytest.approx(
            own["seconds_per_image"], rel=1e-5
        )
        assert ev["budgets"], "the time-budget protocol ran"

    # a second call trains nothing: both runs are finished
    mtimes = {
        a: (scale_dir / "runs" / f"compression_{a}_s0" / "metrics.jsonl").stat().st_mtime for a in metrics
    }
    assert reproduce.main(args) == 0
    assert "0 runs trained, 2 already finished" in (scale_dir / "report.md").read_text()
    assert mtimes == {
        a: (scale_dir / "runs" / f"compression_{a}_s0" / "metrics.jsonl").stat().st_mtime for a in metrics
    }


def fake_run(
    folder: Path, algo: str, seed: int, rewards: list[float], sec: float, epochs: int | None = None
) -> Path:
    folder.mkdir(parents=True)
    cfg = {
        "algo": {"name": algo},
        "task": {"name": "toy_alignment"},
        "seed": seed,
        "sampler": {"num_steps": 4},
        "train": {"epochs": epochs or len(rewards)},
    }
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    recs = [
        {
            "epoch": e,
            "reward_mean": r,
            "wallclock_s": (e + 1) * sec,
            "gpu_hours": (e + 1) * sec / 3600,
            "reward_queries": (e + 1) * 64,
        }
        for e, r in enumerate(rewards)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (folder / "checkpoints" / "final").mkdir(parents=True)
    return folder


def test_seed_mean_threshold_by_hand(tmp_path) -> None:
    fake_run(tmp_path / "r0", "rlcm", 0, [0.1, 0.5, 0.7], 1.0)
    fake_run(tmp_path / "r1", "rlcm", 1, [0.3, 0.5, 0.9], 3.0)  # seed mean 0.2, 0.5, 0.8 at x = 2, 4, 6 s
    fake_run(tmp_path / "d0", "ddpo", 0, [0.2, 0.4, 0.6], 10.0)
    fake_run(tmp_path / "d1", "ddpo", 1, [0.2, 0.4, 0.6], 10.0)
    runs = find_runs(tmp_path)
    curve = seed_mean_curve([r for r in runs if r.algo == "rlcm"], "wallclock_s")
    np.testing.assert_allclose(curve.y, [0.2, 0.5, 0.8])
    np.testing.assert_allclose(curve.y_std, [0.1, 0.0, 0.1])
    np.testing.assert_allclose(curve.x, [2.0, 4.0, 6.0])
    assert time_to_threshold(curve, 0.5) == 4.0 and time_to_threshold(curve, 0.95) is None

    pair = ("rlcm", "ddpo")  # (method, baseline): the speed-up is DDPO's time / RLCM's
    rows = {r["algo"]: r for r in threshold_table(runs, compare=pair)}
    assert rows["rlcm"]["threshold"] == pytest.approx(0.6)  # the lower final seed-mean (DDPO's)
    assert rows["rlcm"]["time_to_threshold_s"] == 6.0 and rows["ddpo"]["time_to_threshold_s"] == 30.0
    assert rows["rlcm"]["speedup_wallclock"] == pytest.approx(5.0)
    rows = {r["algo"]: r for r in threshold_table(runs, thresholds={"toy_alignment": 0.4}, compare=pair)}
    assert rows["rlcm"]["time_to_threshold_s"] == 4.0 and rows["ddpo"]["time_to_threshold_s"] == 20.0
    assert rows["ddpo"]["threshold_source"] == "configured"
    # DDPO never reaches 0.7 in its 30 s: the speed-up is only bounded, by 30 s / RLCM's 6 s
    rows = threshold_table(runs, thresholds={"toy_alignment": 0.7}, compare=pair)
    by = {r["algo"]: r for r in rows}
    assert by["ddpo"]["time_to_threshold_s"] is None and by["rlcm"]["speedup_wallclock"] is None
    assert by["rlcm"]["speedup_wallclock_min"] == pytest.approx(5.0)
    assert "| > 5 |" in threshold_markdown(rows, pair)
    assert "speedup_wallclock" not in threshold_table(runs)[0]  # no pair named: no ratio


def test_finished_means_all_epochs_and_a_final_checkpoint(tmp_path) -> None:
    done = fake_run(tmp_path / "done", "rlcm", 0, [0.1, 0.2], 1.0)
    short = fake_run(tmp_path / "short", "rlcm", 0, [0.1], 1.0, epochs=2)
    assert is_finished(done) and not is_finished(short)
    (done / "checkpoints" / "final").rmdir()
    assert not is_finished(done) and not is_finished(tmp_path / "missing")


@pytest.mark.parametrize("algo", ["rlcm", "ddpo"])
@pytest.mark.parametrize("task", ["compression", "incompression", "aesthetic", "prompt_alignment"])
def test_paper_overlays_choose_the_pair_and_its_hyperparameters(algo: str, task: str) -> None:
    from hydra.utils import instantiate

    from rlcm_exp.tracking import NullLogger

    overlay = compose("config", [f"experiment=paper/{algo}_{task}"])
    plain = compose("config", [f"algo={algo}", f"task={task}"])
    assert overlay.algo.name == algo and overlay.task.name == task
    assert overlay.logger.group == f"paper_{task}" and list(overlay.logger.tags) == ["paper", algo, task]
    for key in ("train", "sampler", "optimizer", "reward"):  # conf/paper/ applies with or without the overlay
        assert overlay[key] == plain[key], key
    assert isinstance(instantiate(overlay.logger), NullLogger)  # logger=none ignores group and tags


def test_algos_choice_plans_the_new_algorithms_and_names_a_bad_one() -> None:
    """`--algos rlcm,ddpo,grpo,rebel` (issue 21): every planned smoke run composes and passes the
    batch checks (groups inside sampling batches, REBEL pairs inside minibatches); an algorithm the
    scale does not list is a ConfigError naming it."""
    from rlcm_exp.errors import ConfigError
    from rlcm_exp.training.build import check_batches

    scale = plan.load_scale("smoke")
    specs = plan.plan_runs(scale, (0,), ("4",), algos=("rlcm", "ddpo", "grpo", "rebel"))
    assert {s.algo for s in specs} == {"rlcm", "ddpo", "grpo", "rebel"}
    for spec in specs:
        cfg = compose("config", list(spec.overrides))
        assert cfg.algo.name == spec.algo
        check_batches(cfg, 1)
    with pytest.raises(ConfigError, match="foo not in conf/reproduce/smoke.yaml"):
        plan.plan_runs(scale, (0,), ("4",), algos=("rlcm", "foo"))


def test_the_algorithm_names_come_from_the_scale_and_study_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No algorithm name is fixed in code: a scale file listing a new conf/algo/ option trains it with
    --algos (and by default, as its method) without a code change; a name the scale does not list is
    a one-line ConfigError naming the scale's; the study's algorithms are its file's."""
    from rlcm_exp.configs import conf_dir
    from rlcm_exp.errors import ConfigError
    from rlcm_exp.reproduction import study

    real = conf_dir()
    toy = OmegaConf.load(real / "study" / "toy.yaml")
    s = study.load_study("toy")
    assert s.algos == tuple(toy.algos) and (s.method, s.baseline) == (toy.method, toy.baseline)
    assert s.colors == {a: toy.algos[a].color for a in toy.algos}

    conf = tmp_path / "conf"
    (conf / "reproduce").mkdir(parents=True)
    shutil.copytree(real / "algo", conf / "algo")
    shutil.copy(real / "algo" / "rlcm.yaml", conf / "algo" / "rlcm_fast.yaml")  # a new algorithm option
    data = OmegaConf.load(real / "reproduce" / "smoke.yaml")
    data.algos = {"rlcm_fast": data.algos.rlcm, "ddpo": data.algos.ddpo}
    data.method = "rlcm_fast"
    OmegaConf.save(data, conf / "reproduce" / "mine.yaml")
    monkeypatch.setattr(plan, "conf_dir", lambda: conf)

    args = ["--scale", "mine", "--seeds", "0", "--figures", "4", "--out", str(tmp_path / "out"), "--dry-run"]
    for extra in (["--algos", "rlcm_fast,ddpo"], []):  # named, and the default (method, baseline)
        assert reproduce.main([*args, *extra]) == 0
        out = capsys.readouterr().out
        assert "would run compression_rlcm_fast_s0" in out and "algo=rlcm_fast task=compression" in out
        assert "would run compression_ddpo_s0" in out
    assert reproduce.main([*args, "--algos", "rlcm,grpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.endswith("--algos: rlcm, grpo not in conf/reproduce/mine.yaml's algos (rlcm_fast, ddpo)")

    data.algos = {**data.algos, "nope": data.algos.ddpo}  # not a conf/algo/ option
    OmegaConf.save(data, conf / "reproduce" / "mine.yaml")
    with pytest.raises(ConfigError, match="algos nope not in conf/algo/"):
        plan.load_scale("mine")

"""Standard prompt sets and the standard evaluation (issue 30): every shipped set is listed with its
source and licence, sets resolve by name or file, the standard benchmarks that are not shipped say
where to get them, `evaluate prompts=SET` writes a table of every reward output at fixed seeds, and
`compare --prompts SET` puts the tables of several runs side by side."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from rlcm_exp.compare import main as compare_main
from rlcm_exp.errors import ConfigError
from rlcm_exp.evaluation.suite import run_evaluation
from rlcm_exp.evaluation.tables import reward_rows
from rlcm_exp.prompts import PROMPT_FILES_DIR, PROMPT_SETS, prompt_set, shipped_prompt_files
from rlcm_exp.rewards.ocr import quoted_text

from .helpers import TOY_SMALL, compose_eval, run_in_process

REPO = Path(__file__).resolve().parents[1]


def test_every_shipped_set_is_listed_with_its_source_and_licence() -> None:
    readme = (PROMPT_FILES_DIR / "README.md").read_text()
    shipped = shipped_prompt_files()
    assert "ocr_signs" in shipped
    for name, path in shipped.items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{name} is not listed in {PROMPT_FILES_DIR / 'README.md'}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[1]) == len(prompt_set(name)), f"{name}: the README's count is stale"
        assert cells[2] and cells[3], f"{name}: source and licence must be given"
        assert name in PROMPT_SETS and prompt_set(name) == [
            x.strip() for x in path.read_text().splitlines() if x.strip()
        ]
    # the package data ships the folder (a wheel without it would have no sets)
    assert '"assets/prompts/*.txt"' in (REPO / "pyproject.toml").read_text()


def test_ocr_set_has_one_quoted_text_per_prompt() -> None:
    for prompt in prompt_set("ocr_signs"):
        assert quoted_text(prompt), prompt
        assert prompt.count('"') == 2, prompt


@pytest.mark.parametrize("name", ["drawbench", "geneval", "partiprompts", "DrawBench"])
def test_standard_sets_not_shipped_say_where_they_come_from(name: str) -> None:
    assert name.lower() not in PROMPT_SETS  # never a stand-in under a benchmark's name
    with pytest.raises(ConfigError, match="is not shipped") as err:
        prompt_set(name)
    assert "licence" in str(err.value)
    with pytest.raises(ConfigError, match="is not shipped"):
        run_evaluation(compose_eval(["model=toy", "task=toy_alignment", f"prompts={name}"]), [])


def test_reward_rows_by_hand() -> None:
    # 2 seeds x 3 prompts; seed means 2 and 4 -> seed std 1; one non-finite value left out of all
    values = {
        "reward": np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]]),
        "b": np.array([[0.0, np.nan, 1.0], [1.0, 1.0, 1.0]]),
    }
    rows = reward_rows(values)
    assert [r["reward"] for r in rows] == ["reward", "b"]
    assert rows[0] == {
        "reward": "reward",
        "mean": 3.0,
        "std": pytest.approx(math.sqrt(10 / 6)),  # deviations 4, 1, 0, 0, 1, 4
        "seed_std": 1.0,
        "n": 6,
        "seeds": 2,
    }
    assert (
        rows[1]["n"] == 5
        and rows[1]["mean"] == pytest.approx(0.8)
        and rows[1]["seed_std"] == pytest.approx(0.25)
    )


TOY_RUN = [
    *TOY_SMALL,
    "reward=toy_jpeg_detector",
    "train.epochs=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]


def evaluate(run: Path, prompts: str) -> dict:
    overrides = [f"checkpoint={run}", f"prompts={prompts}", "eval_seeds=2", "timing_repeats=1"]
    return run_evaluation(compose_eval(overrides), overrides)


def test_evaluate_writes_the_table_and_compare_reads_two_runs(tmp_path, capsys) -> None:  # noqa: ANN001
    runs = [tmp_path / "runs" / "lr_small", tmp_path / "runs" / "lr_large"]
    for run, lr in zip(runs, ["0.0001", "0.05"], strict=True):
        run_in_process([*TOY_RUN, f"optimizer.lr={lr}"], run)
    evaluate(runs[0], "ocr_signs")
    table = json.loads((runs[0] / "eval" / "rewards_ocr_signs.json").read_text())
    assert table["prompts"] == "ocr_signs" and table["n_prompts"] == 32 and table["seeds"] == [0, 1]
    rows = {r["reward"]: r for r in table["rows"]}
    # every output of the configured reward: the total, both components and the detector's thirds
    assert {"reward", "detector", "jpeg", "detector/colour", "detector/shape"} <= set(rows)
    assert all(r["n"] == 64 and r["seeds"] == 2 and math.isfinite(r["mean"]) for r in rows.values())
    assert rows["jpeg"]["mean"] < 0 and rows["detector"]["mean"] == 0.0  # no toy caption among OCR prompts
    assert (runs[0] / "eval" / "eval_ocr_signs.json").is_file()
    md = (runs[0] / "eval" / "rewards_ocr_signs.md").read_text()
    assert "| reward | mean | std | seed_std | n | seeds |" in md and "| jpeg |" in md
    with (runs[0] / "eval" / "rewards_ocr_signs.csv").open() as f:
        assert {r["reward"] for r in csv.DictReader(f)} == set(rows)

    # a file of prompts works the same way, named by its stem; a second run for the comparison
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle on a green background\n\na blue square on a yellow background\n")
    evaluate(runs[1], str(captions))
    evaluate(runs[0], str(captions))
    assert json.loads((runs[1] / "eval" / "rewards_captions.json").read_text())["n_prompts"] == 2

    out = tmp_path / "cmp" / "table.md"
    assert compare_main(["--prompts", "captions", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines if re.match(r"\| lr_", line)] == [
        "lr_small",
        "lr_large",
    ]
    with out.with_suffix(".csv").open() as f:
        compared = list(csv.DictReader(f))
    assert [r["run"] for r in compared] == ["lr_small", "lr_large"]
    assert float(compared[0]["jpeg_mean"]) == pytest.approx(
        {
            r["reward"]: r
            for r in json.loads((runs[0] / "eval" / "rewards_captions.json").read_text())["rows"]
        }["jpeg"]["mean"]
    )
    # a folder of runs finds each run's table; a set no run was evaluated on is a clear error
    assert compare_main(["--prompts", "captions", str(tmp_path / "runs")]) == 0
    assert (tmp_path / "runs" / "compare_captions.md").is_file()
    assert compare_main(["--prompts", "drawbench", str(tmp_path / "runs")]) == 2
    assert "prompts=drawbench" in capsys.readouterr().err

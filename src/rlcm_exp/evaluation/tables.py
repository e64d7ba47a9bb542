"""The standard evaluation's reward table, as papers report it: every output of the configured reward
(the total and each component) over a prompt set at fixed seeds, and the same tables of several runs
side by side (`python -m rlcm_exp.compare --prompts SET`).

One table per (checkpoint, prompt set): OUT/rewards_<set>.json (what `compare` reads), .md and .csv.
Per reward output: `mean` over all prompts x seeds images, `std` over those images, `seed_std` the
standard deviation over seeds of each seed's mean over the prompts (how much the number moves with
the seed), `n` images (non-finite values are left out of every statistic), `seeds`.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlcm_exp.errors import ConfigError

COLUMNS = ("reward", "mean", "std", "seed_std", "n", "seeds")


def table_name(label: str) -> str:
    """rewards_<label> with anything but letters, digits, '.', '_' and '-' replaced by '_'."""
    return "rewards_" + re.sub(r"[^A-Za-z0-9._-]", "_", label)


def reward_rows(values: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per reward output from its (seeds, prompts) values: the total "reward" first."""
    rows = []
    for key in sorted(values, key=lambda k: (k != "reward", k)):
        v = np.asarray(values[key], dtype=np.float64)
        finite = np.isfinite(v)
        per_seed = np.array([row[ok].mean() for row, ok in zip(v, finite, strict=True) if ok.any()])
        rows.append(
            {
                "reward": key,
                "mean": float(v[finite].mean()) if finite.any() else float("nan"),
                "std": float(v[finite].std()) if finite.any() else float("nan"),
                "seed_std": float(per_seed.std()) if len(per_seed) else float("nan"),
                "n": int(finite.sum()),
                "seeds": int(v.shape[0]),
            }
        )
    return rows


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]


def _csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_reward_table(out: Path, table: dict[str, Any]) -> list[Path]:
    """`table` ({"prompts": label, ..., "rows": reward_rows(...)}) as OUT/rewards_<label>.json, .md, .csv."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / table_name(str(table["prompts"]))
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".csv")]
    paths[0].write_text(json.dumps(table, indent=1))
    body = [[r[c] for c in COLUMNS] for r in table["rows"]]
    title = (
        f"# Rewards on {table['prompts']} ({table['n_prompts']} prompts x {len(table['seeds'])} seeds "
        f"{table['seeds']}): {table['checkpoint'] or 'base model'}"
    )
    paths[1].write_text("\n".join([title, "", *_markdown(COLUMNS, body)]) + "\n")
    _csv(paths[2], COLUMNS, body)
    return paths


def find_tables(paths: Sequence[Path], label: str) -> list[Path]:
    """The rewards_<label>.json tables of `paths`, in order: a table file itself, a run dir (its
    eval/ folder), an evaluation folder, or a folder of runs (each run's eval/)."""
    name = table_name(label) + ".json"
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif (path / "eval" / name).is_file():
            found.append(path / "eval" / name)
        elif (path / name).is_file():
            found.append(path / name)
        else:
            found += sorted(path.glob(f"*/eval/{name}"))
    if not found:
        raise ConfigError(
            f"no {name} under {', '.join(map(str, paths))}: write one with "
            f"`python -m rlcm_exp.evaluate checkpoint=RUN prompts={label}`"
        )
    return found


def run_label(table: Mapping[str, Any], path: Path) -> str:
    """A run's name in the comparison: the folder of RUN/eval/<table> where it was found, else the
    run dir the table names, else the table's folder; " (ema)" for the EMA weights."""
    run_dir = table.get("run_dir")
    if path.parent.name == "eval" or not run_dir:
        name = path.resolve().parent.parent.name if path.parent.name == "eval" else path.resolve().parent.name
    else:
        name = Path(run_dir).name
    return name + (" (ema)" if table.get("ema") else "")


def compare_tables(tables: Sequence[Path], out: Path) -> list[Path]:
    """One row per run: each reward output's mean and seed std (columns in the order first seen),
    the prompts and n; written as OUT.md and OUT.csv."""
    loaded = [(json.loads(p.read_text()), p) for p in tables]
    keys = list(dict.fromkeys(r["reward"] for t, _ in loaded for r in t["rows"]))
    md_rows, csv_rows = [], []
    for table, path in loaded:
        by_key = {r["reward"]: r for r in table["rows"]}
        row = [run_label(table, path), table["prompts"], table["n_prompts"], len(table["seeds"])]
        md_rows.append(
            row
            + [f"{by_key[k]['mean']:.4f} ± {by_key[k]['seed_std']:.4f}" if k in by_key else "" for k in keys]
        )
        csv_rows.append(row + [x for k in keys for x in _mean_and_std(by_key.get(k))])
    head = ["run", "prompts", "n_prompts", "seeds"]
    labels = sorted({str(t["prompts"]) for t, _ in loaded})
    title = f"# Rewards on {', '.join(labels)}: mean ± std over seeds, one row per run"
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join([title, "", *_markdown(head + keys, md_rows)]) + "\n")
    _csv(csv_path, head + [f"{k}_{s}" for k in keys for s in ("mean", "seed_std")], csv_rows)
    return [md, csv_path]


def _mean_and_std(row: Mapping[str, Any] | None) -> tuple[Any, Any]:
    return ("", "") if row is None else (row["mean"], row["seed_std"])

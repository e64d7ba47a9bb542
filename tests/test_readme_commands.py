"""Every training command of README.md that runs on the toy or tiny family finishes, as written
(issue 19): run through the real entry point, in a fresh folder, with only the run dir added.

The commands are read from the README's bash blocks, so a command added there is tested here. Tiny
runs and toy runs of 1-3 epochs take seconds and run by default; toy runs with their default epochs are marked slow (a minute
or two on one core: `make test` runs them), sweeps slow and long (the 6-run toy sweep is 10+ minutes
on one core, so only `pytest -m long tests/test_readme_commands.py` runs it). Wall-clock times
are printed and, when RLCM_README_TIMES names a file, appended to it as JSON lines: the README's
figures are measured this way, never asserted (a benchmark measures speed, a test behaviour).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def training_commands(text: str) -> list[str]:
    """`python -m rlcm_exp ...` lines (comments stripped) that the toy or tiny family can run here."""
    found = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split(" #")[0].strip()
            if not re.match(r"python -m rlcm_exp(\s|$)", command):
                continue
            args = shlex.split(command)[3:]
            if any(a in ("model=toy", "model=tiny") or a.startswith("experiment=toy/") for a in args) or (
                "experiment=quickstart" in args
            ):
                found.append(command)
    return found


def python_snippet(text: str, filename: str) -> str | None:
    """A ```python block of the README that starts with `# FILENAME` (a user file a command needs)."""
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.startswith(f"# {filename}\n"):
            return block
    return None


def is_quick(command: str) -> bool:
    """Seconds to a minute on a 2-core CPU: a single tiny-family run, or a toy run of a few epochs (a
    toy run with its default epochs, or any sweep, takes minutes)."""
    args = shlex.split(command)[3:]
    few_epochs = any(re.fullmatch(r"train\.epochs=[1-3]", a) for a in args)
    return "-m" not in args and ("model=tiny" in args or few_epochs)


def tier(command: str) -> tuple[pytest.MarkDecorator, ...]:
    """No marker for a quick command, `slow` for a single toy run, `slow` and `long` for a sweep."""
    if is_quick(command):
        return ()
    return (pytest.mark.slow, pytest.mark.long) if "-m" in shlex.split(command)[3:] else (pytest.mark.slow,)


COMMANDS = training_commands(README.read_text())


def test_the_readme_has_training_commands_for_the_toy_and_tiny_families() -> None:
    assert any(is_quick(c) for c in COMMANDS) and any("model=toy" in c for c in COMMANDS), COMMANDS


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "command",
    [pytest.param(c, marks=tier(c), id=re.sub(r"[^\w=,./-]+", "_", c[19:])) for c in COMMANDS],
)
def test_a_readme_training_command_finishes(command: str, tmp_path: Path, tiny_cache: str) -> None:
    readme = README.read_text()
    args = shlex.split(command)[3:]
    for name in {m + ".py" for a in args for m in re.findall(r"_target_=(\w+)\.", a)}:
        snippet = python_snippet(readme, name)
        assert snippet, f"{command!r} needs {name}, which the README does not show"
        (tmp_path / name).write_text(snippet)  # `python -m` puts the working folder on sys.path
    sweep = "-m" in args
    out = tmp_path / ("sweep" if sweep else "run")
    args.append(f"hydra.{'sweep' if sweep else 'run'}.dir={out}")
    env = {**os.environ, "RLCM_EXP_CACHE": tiny_cache, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rlcm_exp", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=3600,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    runs = sorted(p.parent for p in out.rglob("config.yaml") if (p.parent / "metrics.jsonl").is_file())
    assert runs, f"{command}: no run dir with metrics under {out}"
    for run in runs:
        from omegaconf import OmegaConf

        epochs = OmegaConf.load(run / "config.yaml").train.epochs
        rows = (run / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == epochs, f"{run}: {len(rows)} of {epochs} epochs"
    print(f"README command took {seconds:.1f} s ({len(runs)} run(s)): {command}")
    if os.environ.get("RLCM_README_TIMES"):
        with open(os.environ["RLCM_README_TIMES"], "a") as f:
            f.write(json.dumps({"command": command, "seconds": round(seconds, 1), "runs": len(runs)}) + "\n")

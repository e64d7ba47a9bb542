"""Every command answers --help with its usage and exit code 0, quickly and without loading a model
(issue 18): the command a user types, run as a subprocess from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# command (what follows `python -m`) -> what its help must name: its main options
COMMANDS = {
    "rlcm_exp": [
        "resume",
        "epochs",
        "sampler:",
        "model:",
        "Override anything",
        # the layers applied without a GROUP= on the command line (conf/config.yaml's defaults list)
        "Applied automatically",
        "conf/paper/ALGO_TASK.yaml",
        "~paper",
        "conf/model_defaults/MODEL.yaml",
        "~model_defaults",
        "--info defaults-tree",
    ],
    "rlcm_exp.sample": ["usage: python -m rlcm_exp.sample", "prompts", "out", "overwrite", "checkpoint"],
    "rlcm_exp.evaluate": ["checkpoint", "steps", "budgets", "budget_points"],
    "rlcm_exp.export": ["usage: python -m rlcm_exp.export", "--format", "--out", "--overwrite"],
    "rlcm_exp.compare": ["usage: python -m rlcm_exp.compare", "sweep_dir", "--out", "--metric"],
    "rlcm_exp.reproduce": ["usage: python -m rlcm_exp.reproduce", "--scale", "--out", "--dry-run"],
    "rlcm_exp.reward_server": ["usage: python -m rlcm_exp.reward_server", "reward=", "host", "port", "token"],
    "rlcm_exp.toy.recipe": ["usage:", "--out", "--schedule", "--seed"],
    "rlcm_exp.toy.quality": ["usage:", "--weights", "--n", "--seed"],
    "benchmarks.bench": ["usage: python -m benchmarks.bench", "--scale", "--repeats", "--out"],
}


@pytest.mark.subprocess
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help(command: str, tmp_path: Path) -> None:
    # an empty model cache and no hub: a command that built or fetched a model would leave files here
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "RLCM_EXP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))  # benchmarks/
    proc = subprocess.run(
        [sys.executable, "-m", command, "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    missing = [word for word in COMMANDS[command] if word not in proc.stdout]
    assert not missing, f"`python -m {command} --help` does not name {missing}:\n{proc.stdout[:3000]}"
    assert not any(cache.iterdir()), "--help built a model"

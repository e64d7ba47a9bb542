"""What produced a result: the code's git commit and the versions of the software that ran it."""

from __future__ import annotations

import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

from rlcm_exp.configs import conf_dir

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "hydra-core", "wandb", "rlcm-exp")


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it (untracked run outputs do not count);
    "unknown" outside a git checkout (an installed wheel)."""
    cwd = str(conf_dir())
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def software_versions() -> dict[str, str]:
    """Versions of what produced the numbers (written next to them)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out

"""rlcm-exp: reinforcement learning for latent consistency models (RLCM) and diffusion models (DDPO).

The Python API (rlcm_exp.api): `run(overrides, run_dir=None) -> records`, `read_records(run_dir)`,
`load_policy(run_dir, device="cpu")`. They load on first use: importing rlcm_exp stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_policy", "read_records", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rlcm_exp import api

        return getattr(api, name)
    raise AttributeError(f"module 'rlcm_exp' has no attribute {name!r}")

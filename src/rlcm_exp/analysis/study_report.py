"""The study's report (written in the next step)."""

from __future__ import annotations

from typing import Any


def write(*args: Any) -> Any:
    raise NotImplementedError

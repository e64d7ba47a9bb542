"""The conditioning record: what a family's denoiser is conditioned on, one row per sample.

Each model family decides which tensors it needs (SD 1.x: the text states; SDXL: states and the
pooled projection; SD3: states and pooled; FLUX: pooled CLIP, T5 states, text ids; masks for the
families that use them). Everything outside the family only selects rows (`cond[rows]`),
concatenates records (`Conditioning.cat`) and moves them; it never looks inside. So a new family
adds fields, not a new path through the trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditioning:
    """Named tensors sharing their first (row) dimension. The first field is the primary one: its
    dtype is the dtype the denoiser runs in (the text encoder's, as the pipelines do)."""

    fields: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError("a Conditioning needs at least one field")
        rows = {name: t.shape[0] for name, t in self.fields.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"conditioning fields disagree on their number of rows: {rows}")

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    def __getitem__(self, rows: torch.Tensor | slice | int) -> Conditioning:
        """The rows `rows` of every field (an int keeps the row dimension)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return Conditioning({name: t[rows] for name, t in self.fields.items()})

    def field(self, name: str) -> torch.Tensor:
        return self.fields[name]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.fields.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.fields.values())).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`; floating fields also in `dtype` (integer fields such as ids keep theirs)."""
        return Conditioning(
            {
                name: t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                for name, t in self.fields.items()
            }
        )

    def expand(self, rows: int) -> Conditioning:
        """A one-row record broadcast to `rows` rows (a view): the unconditional half of guidance."""
        return Conditioning({name: t.expand(rows, *t.shape[1:]) for name, t in self.fields.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Rows of `parts` in order; every part has the same fields."""
        names = list(parts[0].fields)
        for part in parts[1:]:
            if list(part.fields) != names:
                raise ValueError(
                    f"cannot concatenate conditionings with fields {names} and {list(part.fields)}"
                )
        return Conditioning({name: torch.cat([p.fields[name] for p in parts]) for name in names})

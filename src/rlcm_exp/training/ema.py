"""Exponential moving average of the trained LoRA weights (`train.ema_decay`; off by default).

After every optimizer step: shadow <- decay * shadow + (1 - decay) * theta. Flow-GRPO evaluates
with such weights. The shadow lives in fp32 next to the LoRA parameters, is written into every
checkpoint (ema.pt) and restored on resume, so a resumed run's EMA is bit-identical. `swapped()`
puts the shadow into the UNet for a held-out evaluation or an export and puts theta back after.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in (0, 1)")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)  # s + (1 - decay) * (p - s)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the LoRA {len(self.shadow)}")
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the LoRA parameters for the block's duration; theta restored exactly after."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup, strict=True):
                    p.copy_(b)

"""Per-prompt reward normalisation (advantages), as in DDPO/RLCM.

Each prompt keeps a deque of its most recent rewards (`buffer_size`). A reward is normalised by
its prompt's buffer mean/std once the buffer holds at least `min_count` values, otherwise by the
whole gathered batch's. Buffers persist across epochs; `state_dict` makes them resumable.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class PerPromptStatTracker:
    def __init__(self, buffer_size: int, min_count: int, eps: float = 1e-6) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size ({buffer_size}) and min_count ({min_count}) must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this round's rewards to the buffers and return their advantages, shape (N,)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts but {len(rewards)} rewards")
        batch_mean, batch_std = rewards.mean(), rewards.std() + self.eps
        advantages = np.empty_like(rewards)
        prompt_array = np.array(prompts, dtype=object)
        for prompt in dict.fromkeys(prompts):  # unique, in first-seen order
            mask = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer) + self.eps
            advantages[mask] = (rewards[mask] - mean) / std
        return advantages

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(buf) for prompt, buf in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def per_prompt_advantages(
    rewards: np.ndarray, prompts: list[str], groups: np.ndarray, tracker: PerPromptStatTracker
) -> np.ndarray:
    """The `algo.advantage` of DDPO and RLCM: the per-prompt tracker's normalisation (its buffers
    persist across rounds; the group ids are not used)."""
    return tracker.update(prompts, rewards)

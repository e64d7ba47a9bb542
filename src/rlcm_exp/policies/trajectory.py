"""The record of a batch of rollouts, shared by every policy (data only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    prompts: list[str]
    prompt_embeds: (
        torch.Tensor
    )  # (B, L, D) text-encoder states the UNet saw (conditional only); SDXL: (B, L + 1, D), pooled last
    latents: torch.Tensor  # (B, T, C, h, w) state x before each trained transition
    next_latents: torch.Tensor  # (B, T, C, h, w) the action: x after each trained transition
    log_probs: torch.Tensor  # (B, T) float32 log pi_old(next | latents), element-averaged
    images: torch.Tensor  # (B, 3, H, W) float32 decoded final images in [0, 1]

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def from_steps(
        prompts: list[str],
        prompt_embeds: torch.Tensor,
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        images: torch.Tensor,
    ) -> Trajectory:
        """A rollout from its trained transitions in order, each (state, action, log-prob)."""
        latents, next_latents, log_probs = zip(*steps, strict=True)
        return Trajectory(
            prompts=list(prompts),
            prompt_embeds=prompt_embeds,
            latents=torch.stack(latents, dim=1),
            next_latents=torch.stack(next_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            images=images,
        )

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        return Trajectory(
            prompts=[p for t in parts for p in t.prompts],
            prompt_embeds=torch.cat([t.prompt_embeds for t in parts]),
            latents=torch.cat([t.latents for t in parts]),
            next_latents=torch.cat([t.next_latents for t in parts]),
            log_probs=torch.cat([t.log_probs for t in parts]),
            images=torch.cat([t.images for t in parts]),
        )

"""The record of a batch of rollouts, shared by every policy (data only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlcm_exp.policies.conditioning import Conditioning


@dataclass
class Trajectory:
    prompts: list[str]
    conditioning: Conditioning  # what the denoiser saw (conditional only), one row per sample
    latents: torch.Tensor  # (B, T, C, h, w) state x before each trained transition
    next_latents: torch.Tensor  # (B, T, C, h, w) the action: x after each trained transition
    log_probs: torch.Tensor  # (B, T) float32 log pi_old(next | latents), element-averaged
    # (B, C, h, w) float32 the final clean latent, what `images` decodes (LCM: the last call's denoised
    # estimate; DDIM: the last action): what updates that train on the outcome rather than on
    # recorded transitions (DiffusionNFT, AWM, Diffusion-DPO) need
    final_latents: torch.Tensor
    images: torch.Tensor  # (B, 3, H, W) float32 decoded final images in [0, 1]

    def __len__(self) -> int:
        return len(self.prompts)

    @staticmethod
    def from_steps(
        prompts: list[str],
        conditioning: Conditioning,
        steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        final_latents: torch.Tensor,
        images: torch.Tensor,
    ) -> Trajectory:
        """A rollout from its trained transitions in order, each (state, action, log-prob)."""
        latents, next_latents, log_probs = zip(*steps, strict=True)
        return Trajectory(
            prompts=list(prompts),
            conditioning=conditioning,
            latents=torch.stack(latents, dim=1),
            next_latents=torch.stack(next_latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            final_latents=final_latents,
            images=images,
        )

    @staticmethod
    def cat(parts: list[Trajectory]) -> Trajectory:
        return Trajectory(
            prompts=[p for t in parts for p in t.prompts],
            conditioning=Conditioning.cat([t.conditioning for t in parts]),
            latents=torch.cat([t.latents for t in parts]),
            next_latents=torch.cat([t.next_latents for t in parts]),
            log_probs=torch.cat([t.log_probs for t in parts]),
            final_latents=torch.cat([t.final_latents for t in parts]),
            images=torch.cat([t.images for t in parts]),
        )

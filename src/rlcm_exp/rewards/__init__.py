"""Rewards: one file per family. Every reward is a callable built by a `_target_` builder:

    reward(images, prompts) -> torch.Tensor (B,) float32 on the CPU
      images:  (B, 3, H, W) float in [0, 1], on any device (the policy's)
      prompts: the B prompts the images were sampled for

A reward may instead return a dict with key "reward" (B,) plus named components (B,) each,
which the trainer logs as reward/<name>. Callables must be thread-safe: the trainer scores one
sampling batch in a worker thread while the next batch samples.
"""

"""Rewards: one file per family, plus what they all share in base.py (the contract, the one builder
`build_reward`, the output normaliser `as_reward_dict`, the image conversion `to_uint8`) and
loading of pretrained parts in hub.py.

    reward(images, prompts) -> (B,) scores, or a dict with key "reward" (B,) plus named components
      images:  (B, 3, H, W) float in [0, 1], on any device (the policy's)
      prompts: the B prompts the images were sampled for

Components are logged by the trainer as reward/<name>. A reward's `_target_` names a builder that
returns the callable, or is a plain function `fn(images, prompts, **options)` itself. Callables must
be thread-safe: the trainer scores one sampling batch in a worker thread while the next batch samples.
"""

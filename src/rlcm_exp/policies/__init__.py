"""Samplers as Gaussian policies: one file per sampler (lcm.py, ddim.py), no shared base class.

Both expose the same duck-typed surface used by the trainer:
  num_transitions: int                      trained transitions per trajectory (T)
  unet: torch.nn.Module                     the module that carries the LoRA parameters
  sample(prompts, generator) -> Trajectory  a batch of rollouts, no grad
  log_prob(latents, next_latents, step_index, prompt_embeds) -> (B,) log pi_theta, with grad
"""

"""rlcm-exp: reinforcement learning for latent consistency models (RLCM) and diffusion models (DDPO)."""

__version__ = "0.1.0"

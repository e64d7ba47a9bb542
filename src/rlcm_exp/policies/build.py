"""The one way to build a policy from a composed config: the model family (cfg.model) -> the sampler
(cfg.sampler) over the member it drives. Training, evaluation, sampling and export all call this."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from rlcm_exp.policies.base import Policy


def build_policy(
    cfg: DictConfig, device: torch.device | str, family: Any = None, **sampler_overrides: Any
) -> Policy:
    """Model family (built from cfg.model unless given: evaluation shares one across step counts)
    -> the sampler-as-policy over the member it drives (no LoRA attached)."""
    family = instantiate(cfg.model) if family is None else family
    # objects go in through a partial: instantiate() would turn a dataclass keyword argument into a
    # config node. _partial_ is also in the sampler configs, but configs saved by older runs lack it
    policy: Policy = instantiate(cfg.sampler, _partial_=True, **sampler_overrides)(
        family=family, device=device
    )
    return policy

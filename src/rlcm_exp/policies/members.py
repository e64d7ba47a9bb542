"""Which member of a model family ("lcm" or "diffusion") a sampler config drives, read without
loading any model (the export's model card needs it for a run that is not loaded)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rlcm_exp.errors import ConfigError
from rlcm_exp.policies.ddim import DDIMPolicy, build_ddim_policy
from rlcm_exp.policies.flow import FLOW_SAMPLERS, build_flow_policy
from rlcm_exp.policies.lcm import LCMPolicy, build_lcm_policy

# each builder a sampler config may name -> the family member it loads ("lcm": the few-step member),
# or, for the flow builder, that member read from the config's `kind`
BUILDERS: dict[Callable[..., Any], str | Callable[[Mapping[str, Any]], str]] = {
    build_lcm_policy: LCMPolicy.member,
    build_ddim_policy: DDIMPolicy.member,
    build_flow_policy: lambda cfg: FLOW_SAMPLERS.get(str(cfg.get("kind")), ("diffusion", None))[0],
}


def sampler_member(sampler_cfg: Mapping[str, Any]) -> str:
    """The family member the sampler config's builder loads, e.g. "lcm" for conf/sampler/lcm.yaml."""
    from hydra.utils import get_method

    target = str(sampler_cfg.get("_target_"))
    try:
        builder = get_method(target)
    except Exception as err:  # ImportError, AttributeError, ValueError: all "no such builder"
        raise ConfigError(f"sampler._target_={target} cannot be imported: {err}") from err
    member = BUILDERS.get(builder)
    if member is None:
        known = sorted(f"{b.__module__}.{b.__name__}" for b in BUILDERS)
        raise ConfigError(f"sampler._target_={target} is not a known policy builder (one of {known})")
    return member if isinstance(member, str) else member(sampler_cfg)

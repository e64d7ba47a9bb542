"""Model families (a diffusion model and its LCM), how members load, LoRA, and synthetic members.

family.py: what a family is and the tiny families (the toy world's is rlcm_exp.toy.family); hub.py: loading a member (local folder or
hub id); synthetic.py: random members built from configs; lora.py: attach, save and load LoRA.
"""

from rlcm_exp.models.family import ModelFamily, tiny_family
from rlcm_exp.models.hub import MemberSource
from rlcm_exp.models.lora import attach_lora

__all__ = ["MemberSource", "ModelFamily", "attach_lora", "tiny_family"]

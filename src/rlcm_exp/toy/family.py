"""The toy world's model family (model=toy): its committed diffusion model and distilled LCM, loaded
through the library's ModelFamily like any other local folders. A plug-in: the library never imports
it; conf/model/toy.yaml names it."""

from __future__ import annotations

from pathlib import Path

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import ModelFamily, member_resolution
from rlcm_exp.models.hub import MemberSource
from rlcm_exp.toy import WEIGHTS_DIR

TOY_WEIGHTS = WEIGHTS_DIR  # the committed toy weights (rlcm_exp.toy.WEIGHTS_DIR)


def toy_family(weights_dir: str | None = None) -> ModelFamily:
    """The toy world's trained members (committed under src/rlcm_exp/toy/weights, see `make toy-model`)."""
    root = Path(weights_dir).expanduser() if weights_dir else TOY_WEIGHTS
    if not (root / "lcm" / "model_index.json").is_file():
        raise ConfigError(
            f"model=toy: no toy weights in {root} (expected lcm/ and diffusion/ pipeline folders). "
            "Rebuild them with `make toy-model`, or use model=tiny."
        )
    return ModelFamily(
        name="toy",
        diffusion=MemberSource(
            local_path=str(root / "diffusion"), resolution=member_resolution(root / "diffusion")
        ),
        lcm=MemberSource(local_path=str(root / "lcm"), resolution=member_resolution(root / "lcm")),
    )

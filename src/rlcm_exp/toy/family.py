"""The toy world's model families, loaded through the library's ModelFamily like any other local
folders: model=toy (its committed diffusion model and distilled LCM) and model=toy_flow (its
rectified-flow teacher and consistency-distilled few-step student). A plug-in: the library never
imports it; conf/model/toy.yaml and toy_flow.yaml name it."""

from __future__ import annotations

from pathlib import Path

from rlcm_exp.errors import ConfigError
from rlcm_exp.models.family import ModelFamily, member_resolution
from rlcm_exp.models.hub import MemberSource
from rlcm_exp.toy import FLOW_WEIGHTS_DIR, WEIGHTS_DIR

TOY_WEIGHTS = WEIGHTS_DIR  # the committed toy weights (rlcm_exp.toy.WEIGHTS_DIR)


def _local_members(name: str, root: Path, members: dict[str, str], rebuild: str) -> dict[str, MemberSource]:
    """{member kind: source} of the pipeline folders under `root`, {member kind: folder name}; a clear
    error naming `rebuild` (how to remake them) when one is missing."""
    missing = [folder for folder in members.values() if not (root / folder / "model_index.json").is_file()]
    if missing:
        expected = " and ".join(f"{folder}/" for folder in members.values())
        raise ConfigError(
            f"model={name}: no {name} weights in {root} (expected {expected} pipeline folders). {rebuild}"
        )
    sources = {
        kind: MemberSource(local_path=str(root / folder), resolution=member_resolution(root / folder))
        for kind, folder in members.items()
    }
    return sources


def toy_family(weights_dir: str | None = None) -> ModelFamily:
    """The toy world's trained members (committed under src/rlcm_exp/toy/weights, see `make toy-model`)."""
    root = Path(weights_dir).expanduser() if weights_dir else TOY_WEIGHTS
    members = {"lcm": "lcm", "diffusion": "diffusion"}
    found = _local_members("toy", root, members, "Rebuild them with `make toy-model`, or use model=tiny.")
    return ModelFamily(name="toy", diffusion=found["diffusion"], lcm=found["lcm"])


def toy_flow_family(weights_dir: str | None = None) -> ModelFamily:
    """The toy flow pair (committed under src/rlcm_exp/toy/weights_flow, see `make toy-flow-model`), a
    rectified-flow family: the teacher in the many-step (`diffusion`) slot, which sampler=flow_sde and
    cps drive, its consistency-distilled student in the few-step (`lcm`) slot, sampler=flow_consistency's."""
    root = Path(weights_dir).expanduser() if weights_dir else FLOW_WEIGHTS_DIR
    members = {"diffusion": "teacher", "lcm": "student"}
    found = _local_members("toy_flow", root, members, "Rebuild them with `make toy-flow-model`.")
    return ModelFamily(
        name="toy_flow", diffusion=found["diffusion"], lcm=found["lcm"], process="rectified_flow"
    )

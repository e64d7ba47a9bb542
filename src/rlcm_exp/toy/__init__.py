"""The toy world: coloured shapes, a detector, and a CPU-trained diffusion model + its LCM.

`data` draws images and captions, `detector` scores an image against its caption. The recipe
that trains the committed weights under `weights/`: `build` (the models, schedulers and pipelines),
`captions` (caption noise), `stages` (VAE, latent pool, teacher, distillation), `runner` (`run`:
every stage in order, saved and measured); `scoring` (`measure`) measures them. `recipe` and
`quality` are their command lines. The toy flow pair (`weights_flow/`, model=toy_flow) shares the VAE
and text encoder: `flow` (its samplers for the quality table), `flow_stages`, `flow_runner`
(`run_flow`, `recipe --family flow`) and `flow_scoring` (`measure_flow`).
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIFFUSION_DIR = WEIGHTS_DIR / "diffusion"
LCM_DIR = WEIGHTS_DIR / "lcm"
# The toy flow pair (model=toy_flow): rectified-flow teacher and its consistency-distilled student.
FLOW_WEIGHTS_DIR = Path(__file__).parent / "weights_flow"

__all__ = ["DIFFUSION_DIR", "FLOW_WEIGHTS_DIR", "LCM_DIR", "WEIGHTS_DIR"]

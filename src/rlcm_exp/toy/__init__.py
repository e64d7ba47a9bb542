"""The toy world: coloured shapes, a detector, and a CPU-trained diffusion model + its LCM.

`data` draws images and captions, `detector` scores an image against its caption. The recipe
that trains the committed weights under `weights/`: `build` (the models, schedulers and pipelines),
`captions` (caption noise), `stages` (VAE, latent pool, teacher, distillation), `runner` (`run`:
every stage in order, saved and measured); `scoring` (`measure`) measures them. `recipe` and
`quality` are their command lines.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIFFUSION_DIR = WEIGHTS_DIR / "diffusion"
LCM_DIR = WEIGHTS_DIR / "lcm"

__all__ = ["DIFFUSION_DIR", "LCM_DIR", "WEIGHTS_DIR"]

"""The toy world: coloured shapes, a detector, and a CPU-trained diffusion model + its LCM.

`data` draws images and captions, `detector` scores an image against its caption, `recipe`
trains the committed weights under `weights/`, `quality` measures them.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
DIFFUSION_DIR = WEIGHTS_DIR / "diffusion"
LCM_DIR = WEIGHTS_DIR / "lcm"

__all__ = ["DIFFUSION_DIR", "LCM_DIR", "WEIGHTS_DIR"]

"""One training run: the composition root (build.py), the epoch loop (trainer.py), its settings,
batch arithmetic, checkpoints and callbacks."""

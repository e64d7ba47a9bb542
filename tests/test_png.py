"""rlcm_exp/evaluation/png.py writes the bytes torchvision's save_image writes (grids and single
images), so the sample grids need no torchvision on an air-gapped GPU image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlcm_exp.evaluation.png import grid, save_png


def test_grid_layout_by_hand() -> None:
    images = torch.ones(3, 1, 2, 2)  # 3 white 2x2 cells, 2 a row, 2 px borders: 2 rows of 2 + 3 borders
    g = grid(images, nrow=2)
    assert g.shape == (1, 2 * 2 + 3 * 2, 2 * 2 + 3 * 2)
    assert g[0, 2:4, 2:4].eq(1).all() and g[0, 2:4, 6:8].eq(1).all() and g[0, 6:8, 2:4].eq(1).all()
    assert g[0, 6:8, 6:8].eq(0).all() and g.sum() == 12  # the missing fourth cell stays black
    assert grid(torch.ones(1, 3, 4, 4)).shape == (3, 4, 4)  # a single image is not padded


@pytest.mark.parametrize(("n", "nrow"), [(1, 1), (5, 3), (4, 2)])
def test_the_same_pixels_as_torchvision(tmp_path, n, nrow) -> None:
    tv = pytest.importorskip("torchvision.utils")
    images = torch.rand(n, 3, 8, 6, generator=torch.Generator().manual_seed(n)) * 1.2 - 0.1  # clamped too
    save_png(images, tmp_path / "ours.png", nrow=nrow)
    tv.save_image(images, tmp_path / "tv.png", nrow=nrow)
    ours, theirs = (np.asarray(Image.open(tmp_path / f)) for f in ("ours.png", "tv.png"))
    assert ours.shape == theirs.shape and (ours == theirs).all()

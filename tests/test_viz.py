"""Sample grids: layout, scaling, overlays and atomic writes."""

import numpy as np
from PIL import Image

from medgen_jax import viz


def test_grid_layout_per_channel_blocks_and_upscale():
  x = np.full((5, 8, 8, 2), -1.0, np.float32)
  x[..., 1] = 1.0
  g = viz.image_grid(x, upscale=1)
  # 5 images -> 3 columns x 2 rows per channel block, 2 blocks stacked.
  assert g.shape == (2 * (2 * 10 + 2), 3 * 10 + 2, 3)
  assert g[2, 2, 0] == 0 and g[2 * 10 + 2 + 2, 2, 0] == 255
  assert viz.image_grid(x).shape[0] == g.shape[0] * 16  # 8 px -> 128 px tiles


def test_3d_uses_middle_slice_and_masks_are_coloured():
  vol = np.zeros((1, 4, 6, 6, 1), np.float32)
  vol[0, 2] = 1.0  # only the middle slice is bright
  mask = np.zeros((1, 4, 6, 6), np.uint8)
  mask[0, 2, 1, 1] = 4
  g = viz.image_grid(vol, spatial_dims=3, masks=mask, upscale=1, ncol=1)
  tile = g[2:8, 2:8]
  assert tile[0, 0].tolist() == [255, 255, 255]
  r, gr, b = tile[1, 1].tolist()
  assert r > gr and r > b  # lesion label drawn in red


def test_save_png_roundtrip(tmp_path):
  g = viz.image_grid(np.zeros((4, 8, 8, 1), np.float32), upscale=1)
  path = viz.save_png(g, str(tmp_path / "a" / "grid.png"))
  assert np.array_equal(np.asarray(Image.open(path)), g)
  assert not (tmp_path / "a" / "grid.png.tmp").exists()

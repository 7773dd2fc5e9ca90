"""Image grids for samples and data sets (PNG, no plotting library needed)."""

import os
from typing import Optional

import numpy as np
from PIL import Image

# Overlay colours for label maps (index 0 = transparent background).
_PALETTE = np.array([[0, 0, 0], [66, 135, 245], [80, 200, 120], [245, 200, 66],
                     [235, 64, 52], [180, 80, 220], [255, 255, 255]], np.float32)


def _middle_slice(x: np.ndarray, spatial_dims: int) -> np.ndarray:
  """``[N, D, H, W, ...]`` volumes -> their middle axial slice ``[N, H, W, ...]``."""
  return x[:, x.shape[1] // 2] if spatial_dims == 3 else x


def to_uint8(x: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
  return np.clip((np.asarray(x, np.float32) - lo) / (hi - lo) * 255.0, 0,
                 255).astype(np.uint8)


def tile(images: np.ndarray, ncol: int, pad: int = 2) -> np.ndarray:
  """``[N, H, W, 3]`` uint8 -> one ``[rows*(H+pad)+pad, ..., 3]`` mosaic."""
  n, h, w, c = images.shape
  nrow = -(-n // ncol)
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 32,
                np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, ncol)
    out[pad + r * (h + pad):pad + r * (h + pad) + h,
        pad + q * (w + pad):pad + q * (w + pad) + w] = im
  return out


def overlay(gray: np.ndarray, labels: np.ndarray,
            alpha: float = 0.45) -> np.ndarray:
  """Colours non-zero ``labels`` ``[N, H, W]`` over ``gray`` ``[N, H, W]`` uint8."""
  rgb = np.repeat(gray[..., None].astype(np.float32), 3, axis=-1)
  lab = np.clip(labels.astype(np.int64), 0, len(_PALETTE) - 1)
  colour = _PALETTE[lab]
  m = (lab > 0)[..., None]
  return np.where(m, (1 - alpha) * rgb + alpha * colour, rgb).astype(np.uint8)


def image_grid(images: np.ndarray, spatial_dims: int = 2,
               masks: Optional[np.ndarray] = None,
               ncol: Optional[int] = None,
               upscale: Optional[int] = None) -> np.ndarray:
  """Builds an RGB grid of images in [-1, 1].

  Args:
    images: ``[N, H, W, C]`` (or ``[N, D, H, W, C]`` for 3D: middle slice).
    spatial_dims: 2 or 3.
    masks: optional label maps ``[N, H, W]`` (or 3D) overlaid in colour on
      every channel.
    ncol: columns; default ``ceil(sqrt(N))``. Each channel gets its own block
      of rows, so multi-contrast samples read contrast by contrast.
    upscale: nearest-neighbour upscaling; default makes tiles >= 128 px.

  Returns:
    ``[H', W', 3]`` uint8.
  """
  x = _middle_slice(np.asarray(images), spatial_dims)
  m = None if masks is None else _middle_slice(np.asarray(masks), spatial_dims)
  n = x.shape[0]
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  blocks = []
  for c in range(x.shape[-1]):
    gray = to_uint8(x[..., c])
    rgb = overlay(gray, m) if m is not None else np.repeat(gray[..., None], 3,
                                                           axis=-1)
    blocks.append(tile(rgb, ncol))
  grid = np.concatenate(blocks, axis=0)
  upscale = upscale or max(1, 128 // x.shape[1])
  return np.kron(grid, np.ones((upscale, upscale, 1), np.uint8))


def save_png(grid: np.ndarray, path: str) -> str:
  """Writes ``grid`` atomically (temp file + rename) and returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  Image.fromarray(grid).save(tmp, format="PNG")
  os.replace(tmp, path)
  return path

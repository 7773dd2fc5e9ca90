"""Intensity and geometry preprocessing shared by the folder builders.

Pure numpy/scipy functions. Build-time transforms (those that change shapes:
reorientation, resampling, foreground cropping, resizing, patches) run once in
the TFDS builders, and their settings are part of the builder config name, so
different settings cache to different directories. Intensity windows and
normalisation run in the input pipeline (:mod:`medgen_jax.data.pipeline`).

Display layout of volumes and slices (the same as the brain phantom):
``[slice, row, col]``. Axial: slices inferior->superior, rows anterior at the
top, columns patient left->right (neurological convention). Coronal: slices
posterior->anterior, rows superior at the top, columns left->right. Sagittal:
slices left->right, rows superior at the top, columns anterior->posterior.
"""

from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

# CT windows as (center, width) in Hounsfield units (common radiology presets).
CT_WINDOWS: Dict[str, Tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "stroke": (40.0, 40.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
}
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS array axes.
VOLUME_NORMS = ("none", "zscore", "minmax")

Window = Union[str, Sequence[float]]


class PreprocessError(ValueError):
  """A preprocessing setting that cannot work (the message names it)."""


# ------------------------------------------------------------ intensities --


def resolve_window(window: Window) -> Tuple[float, float]:
  """``(center, width)`` of a preset name or a ``(center, width)`` pair."""
  if isinstance(window, str):
    if window not in CT_WINDOWS:
      raise PreprocessError(f"unknown CT window {window!r}; presets: "
                            f"{sorted(CT_WINDOWS)} or a (center, width) pair")
    return CT_WINDOWS[window]
  values = tuple(float(v) for v in window)
  if len(values) != 2 or not values[1] > 0:
    raise PreprocessError(f"a CT window is (center, width) with width > 0, "
                          f"got {tuple(window)!r}")
  return values


def apply_window(x: np.ndarray, window: Window) -> np.ndarray:
  """Clips ``x`` (in HU) to ``[center - width/2, center + width/2]``."""
  center, width = resolve_window(window)
  return np.clip(x, center - width / 2, center + width / 2).astype(np.float32)


def robust_range(x: np.ndarray, percentiles=(0.5, 99.5)) -> Tuple[float, float]:
  lo, hi = np.percentile(x, percentiles)
  return float(lo), float(hi)


def foreground(x: np.ndarray, threshold: float) -> np.ndarray:
  """Voxels above ``threshold`` of the robust range ``[p0.5, p99.5]``.

  Relative, so it works for MRI (dark background) and CT (air at -1000 HU).

  Args:
    x: any-shaped intensities.
    threshold: fraction in [0, 1) of the range above its low end.

  Returns:
    bool array like ``x``.
  """
  lo, hi = robust_range(x)
  if hi <= lo:
    return np.zeros(x.shape, bool)
  return x > lo + threshold * (hi - lo)


def normalize_volume(x: np.ndarray, kind: str, mask: np.ndarray,
                     percentiles=(0.5, 99.5)) -> np.ndarray:
  """Per-volume intensity normalisation over the ``mask`` voxels.

  MRI has no absolute units, so scans from different scanners are usually
  normalised one by one: ``zscore`` subtracts the foreground mean and divides
  by its std; ``minmax`` maps the foreground percentiles to [0, 1] (clipped).
  ``none`` keeps the values.
  """
  if kind == "none":
    return x.astype(np.float32)
  if kind not in VOLUME_NORMS:
    raise PreprocessError(f"volume_norm must be one of {VOLUME_NORMS}, got "
                          f"{kind!r}")
  values = x[mask] if mask.any() else x.reshape(-1)
  if kind == "zscore":
    mean, std = float(values.mean()), float(values.std())
    return ((x - mean) / max(std, 1e-8)).astype(np.float32)
  lo, hi = robust_range(values, percentiles)
  if hi - lo <= 1e-6 * max(abs(hi), 1.0):
    # A flat foreground (a phantom, a constant fill) has no percentile
    # range: the volume's full range keeps it visible above the background.
    lo, hi = float(x.min()), float(x.max())
  return np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------- geometry --


def bbox(mask: np.ndarray, margin: int = 0) -> Tuple[slice, ...]:
  """Bounding box of the true voxels plus ``margin`` (whole array if none)."""
  if not mask.any():
    return tuple(slice(0, n) for n in mask.shape)
  out = []
  for axis, n in enumerate(mask.shape):
    other = tuple(a for a in range(mask.ndim) if a != axis)
    idx = np.flatnonzero(mask.any(axis=other))
    out.append(slice(max(0, idx[0] - margin), min(n, idx[-1] + 1 + margin)))
  return tuple(out)


def pad_to_extent(x: np.ndarray, spacing: Sequence[float], value: float,
                  axes: Optional[Sequence[int]] = None) -> np.ndarray:
  """Pads ``axes`` symmetrically to the same physical extent (mm).

  Resizing the result to a square/cube then keeps the anatomy's aspect ratio
  even for anisotropic voxels.
  """
  axes = tuple(range(x.ndim)) if axes is None else tuple(axes)
  extent = max(x.shape[a] * spacing[a] for a in axes)
  pads = [(0, 0)] * x.ndim
  for a in axes:
    total = max(0, int(round(extent / spacing[a])) - x.shape[a])
    pads[a] = (total // 2, total - total // 2)
  return np.pad(x, pads, constant_values=value)


def resize(x: np.ndarray, shape: Sequence[int], nearest: bool = False
           ) -> np.ndarray:
  """Resamples ``x`` to ``shape`` (any per-axis factor).

  Images: linear interpolation, with a Gaussian anti-aliasing prefilter on
  the axes that shrink (sigma = (1/zoom - 1) / 2, as scikit-image). Masks
  (``nearest=True``): nearest neighbour, so label values are kept.
  """
  shape = tuple(int(s) for s in shape)
  if x.shape == shape:
    return x
  zoom = np.asarray(shape, np.float64) / np.asarray(x.shape, np.float64)
  if nearest:
    # Index arithmetic rather than ndimage.zoom(order=0): exact pixel-centre
    # sampling, no rounding surprises at the borders.
    idx = [np.minimum((np.arange(n) + 0.5) / z, s - 1).astype(np.int64)
           for n, z, s in zip(shape, zoom, x.shape)]
    return x[np.ix_(*idx)]
  y = x.astype(np.float32)
  sigma = np.maximum(0.0, (1.0 / zoom - 1.0) / 2.0)
  if sigma.any():
    y = ndimage.gaussian_filter(y, sigma, mode="nearest")
  return ndimage.zoom(y, zoom, order=1, mode="nearest", grid_mode=True,
                      output=np.float32)


def resample_spacing(x: np.ndarray, spacing: Sequence[float],
                     target: Sequence[float], nearest: bool = False
                     ) -> np.ndarray:
  """Resamples a volume from voxel ``spacing`` to ``target`` spacing (mm)."""
  shape = [max(1, int(round(n * s / t)))
           for n, s, t in zip(x.shape, spacing, target)]
  return resize(x, shape, nearest=nearest)


def to_display(vol: np.ndarray, axis: str) -> np.ndarray:
  """RAS-ordered ``[X, Y, Z]`` volume -> display ``[slice, row, col]``."""
  if axis == "axial":       # [Z, Y, X], anterior at the top.
    return np.flip(np.transpose(vol, (2, 1, 0)), axis=1)
  if axis == "coronal":     # [Y, Z, X], superior at the top.
    return np.flip(np.transpose(vol, (1, 2, 0)), axis=1)
  if axis == "sagittal":    # [X, Z, Y], superior at the top, anterior left.
    return np.flip(np.transpose(vol, (0, 2, 1)), axis=(1, 2))
  raise PreprocessError(f"slice_axis must be one of {sorted(SLICE_AXES)}, "
                        f"got {axis!r}")


def display_spacing(spacing: Sequence[float], axis: str) -> Tuple[float, ...]:
  """Voxel spacing in the :func:`to_display` axis order."""
  order = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}
  return tuple(float(spacing[a]) for a in order[axis])


def patch_starts(n: int, size: int, stride: int) -> np.ndarray:
  """Start indices covering ``[0, n)`` with the last patch flush at the end."""
  if n <= size:
    return np.zeros(1, np.int64)
  starts = list(range(0, n - size + 1, stride))
  if starts[-1] != n - size:
    starts.append(n - size)
  return np.asarray(starts, np.int64)


def pad_to_min(x: np.ndarray, size: int, value: float) -> np.ndarray:
  """Pads every axis shorter than ``size`` symmetrically to ``size``."""
  pads = [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0)
          for n in x.shape]
  return np.pad(x, pads, constant_values=value)


# ------------------------------------------------------------------ checks --


def non_finite_count(x: np.ndarray) -> int:
  return int(x.size - np.count_nonzero(np.isfinite(x)))


def mask_to_labels(mask: np.ndarray, values: Sequence[int]
                   ) -> Tuple[Optional[np.ndarray], str]:
  """Maps label values to ``0..K-1`` (their order in ``values``).

  Args:
    mask: label map (any numeric dtype).
    values: allowed values; empty keeps the values (which must lie in 0..255).

  Returns:
    ``(uint8 labels, "")``, or ``(None, problem)`` for non-integer or unknown
    values.
  """
  if np.issubdtype(mask.dtype, np.floating):
    bad = non_finite_count(mask)
    if bad:
      return None, f"{bad} NaN/Inf voxels in the label map"
    if not np.array_equal(mask, np.round(mask)):
      return None, ("non-integer label values (e.g. "
                    f"{float(mask[mask != np.round(mask)][0]):g}); a label map "
                    "must hold integer classes")
  found = np.unique(mask).astype(np.int64)
  allowed = np.arange(256) if not len(values) else np.asarray(values, np.int64)
  unknown = np.setdiff1d(found, allowed)
  if unknown.size:
    expect = (f"data.mask_values={tuple(int(v) for v in values)}"
              if len(values) else "0..255")
    return None, (f"unknown label values {unknown.tolist()} (expected "
                  f"{expect})")
  if not len(values):
    return mask.astype(np.uint8), ""
  lut = np.zeros(int(max(found.max(), allowed.max())) + 1, np.uint8)
  lut[allowed] = np.arange(len(allowed), dtype=np.uint8)
  return lut[mask.astype(np.int64)], ""


def window_bounds(windows: Mapping[str, Window], name: str
                  ) -> Optional[Tuple[float, float]]:
  """``(low, high)`` of the window for contrast ``name``, if it has one.

  A contrast ``"<feature>:<preset>"`` (e.g. ``"ct:bone"``) uses the preset
  unless ``windows`` names it explicitly.
  """
  if name in windows:
    c, w = resolve_window(windows[name])
  elif ":" in name and name.split(":", 1)[1] in CT_WINDOWS:
    c, w = CT_WINDOWS[name.split(":", 1)[1]]
  else:
    return None
  return c - w / 2, c + w / 2

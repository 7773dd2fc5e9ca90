"""Segmentation metrics: Dice per class and surface distances (HD95, ASSD).

Masks are batched label maps ``[B, H, W]`` or ``[B, D, H, W]`` (integer class
ids, or booleans for a single foreground). Every metric returns per-case
values so a report can show their spread, not only a mean.

Conventions (explicit because papers differ):

* Dice of a class absent from both prediction and target is undefined; it is
  ``nan`` by default (``empty_value``), so ``np.nanmean`` over cases skips it.
  Pass ``empty_value=1.0`` to count a correctly predicted absence as perfect.
* Surface distances: both masks empty gives ``nan``; exactly one empty gives
  ``inf`` (no boundary to measure to; a missed or hallucinated structure is
  the worst possible outcome, so it must not vanish from the mean).
"""

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def _check_masks(pred, target) -> Tuple[np.ndarray, np.ndarray]:
  pred, target = np.asarray(pred), np.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"pred and target must have the same shape, got "
                     f"{pred.shape} and {target.shape}")
  if pred.ndim not in (3, 4):
    raise ValueError(f"masks: expected [B, H, W] or [B, D, H, W], got shape "
                     f"{pred.shape}")
  for name, a in (("pred", pred), ("target", target)):
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
      raise ValueError(f"{name}: expected integer labels or booleans, got "
                       f"dtype {a.dtype}")
  return pred, target


def dice(pred, target, labels: Optional[Sequence[int]] = None,
         num_classes: Optional[int] = None,
         empty_value: float = float("nan")) -> np.ndarray:
  """Dice similarity coefficient per case and class.

  ``Dice_c = 2 |P_c ∩ T_c| / (|P_c| + |T_c|)``, in [0, 1], higher is better.

  Args:
    pred: ``[B, H, W]`` or ``[B, D, H, W]`` predicted labels.
    target: same shape, reference labels.
    labels: class ids to score, e.g. ``(1, 2, 3)`` to skip background.
    num_classes: alternatively score ids ``0 .. num_classes - 1``. Give
      exactly one of ``labels`` and ``num_classes``.
    empty_value: the value when a class is absent from both masks (see the
      module docstring); ``nan`` by default.

  Returns:
    ``[B, L]`` float32, in the order of ``labels``.
  """
  if (labels is None) == (num_classes is None):
    raise ValueError("dice: give exactly one of labels and num_classes")
  labels = tuple(range(num_classes)) if labels is None else tuple(labels)
  if not labels:
    raise ValueError("dice: no labels to score")
  pred, target = _check_masks(pred, target)
  out = np.empty((pred.shape[0], len(labels)), np.float32)
  axes = tuple(range(1, pred.ndim))
  for j, c in enumerate(labels):
    p, t = pred == c, target == c
    inter = np.sum(p & t, axis=axes)
    total = np.sum(p, axis=axes) + np.sum(t, axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[:, j] = np.where(total > 0, 2.0 * inter / total, empty_value)
  return out


def _surface(mask: np.ndarray) -> np.ndarray:
  """Boundary voxels: in the mask with a face-neighbour outside it (the
  image border counts as outside)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def surface_distances(pred, target,
                      spacing: Optional[Sequence[float]] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """Directed surface distances of one case, in physical units.

  Args:
    pred: ``[H, W]`` or ``[D, H, W]`` boolean mask (non-zero = foreground).
    target: same shape.
    spacing: voxel size per axis (e.g. mm), default 1.

  Returns:
    ``(d_pred_to_target, d_target_to_pred)``: for every boundary voxel of one
    mask, the Euclidean distance to the nearest boundary voxel of the other
    (exact, via ``scipy.ndimage.distance_transform_edt``). Empty arrays when
    the source mask is empty; all ``inf`` when only the other one is.
  """
  pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
  spacing = (1.0,) * pred.ndim if spacing is None else tuple(spacing)
  if len(spacing) != pred.ndim:
    raise ValueError(f"spacing has {len(spacing)} entries for a "
                     f"{pred.ndim}-d mask")
  sp, st = _surface(pred), _surface(target)

  def directed(src, dst):
    if not dst.any():
      return np.full(int(src.sum()), np.inf)
    return ndimage.distance_transform_edt(~dst, sampling=spacing)[src]

  return directed(sp, st), directed(st, sp)


def _per_case(pred, target, spacing, reduce) -> np.ndarray:
  """``reduce(d_pt, d_tp)`` per case, with the empty-mask conventions."""
  pred, target = _check_masks(pred, target)
  out = np.empty(pred.shape[0])
  for b in range(pred.shape[0]):
    a, c = surface_distances(pred[b], target[b], spacing)
    if a.size == 0 and c.size == 0:
      out[b] = np.nan
    elif a.size == 0 or c.size == 0:
      out[b] = np.inf
    else:
      out[b] = reduce(a, c)
  return out


def _hausdorff(pred, target, spacing, percentile: float) -> np.ndarray:
  return _per_case(pred, target, spacing, lambda a, c: max(
      np.percentile(a, percentile), np.percentile(c, percentile)))


def hd95(pred, target, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
  """95th-percentile symmetric Hausdorff distance per case.

  ``HD95 = max(P95(d(∂P -> ∂T)), P95(d(∂T -> ∂P)))`` over boundary voxels
  (the convention of MONAI and DeepMind's surface-distance), with voxel
  counting instead of surface-element areas and numpy's linear percentile
  interpolation. Lower is better; in the units of ``spacing``. Both masks
  empty gives ``nan``, one empty gives ``inf``.

  Args:
    pred: ``[B, H, W]`` or ``[B, D, H, W]``; non-zero is foreground (score a
      class ``c`` with ``pred == c``).
    target: same shape.
    spacing: voxel size per spatial axis (e.g. ``(1.0, 0.9, 0.9)`` mm).

  Returns:
    ``[B]`` float64.
  """
  return _hausdorff(pred, target, spacing, 95.0)


def hausdorff(pred, target,
              spacing: Optional[Sequence[float]] = None) -> np.ndarray:
  """Classical (maximum) symmetric Hausdorff distance per case, ``[B]``;
  the same conventions as :func:`hd95`."""
  return _hausdorff(pred, target, spacing, 100.0)


def assd(pred, target, spacing: Optional[Sequence[float]] = None) -> np.ndarray:
  """Average symmetric surface distance per case, ``[B]``: the mean of both
  directed distance sets pooled. Lower is better; empty masks as in
  :func:`hd95`."""
  return _per_case(pred, target, spacing,
                   lambda a, c: np.concatenate([a, c]).mean())

"""Co-registered 3D scans of one subject -> TFDS examples.

Shared by the ``nifti_folder`` and ``dicom_folder`` builders. A subject is a
set of co-registered volumes (one per modality) and an optional label map;
:func:`subject_examples` reorients them to RAS, optionally resamples to a
target spacing, normalises each volume, crops to the foreground and emits 2D
slices, resized 3D volumes or 3D patches of a fixed size.
"""

import dataclasses
from typing import (Any, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple)

import nibabel as nib
import numpy as np
from absl import logging

from medgen_jax.data import preprocess
from medgen_jax.data.builder_lib import file_error

VOLUME_MODES = ("resize", "patches")
VOLUME_NORMS = ("auto",) + preprocess.VOLUME_NORMS
LABEL_SOURCES = ("csv", "mask", "none")


@dataclasses.dataclass(frozen=True)
class VolumeSettings:
  """Build-time geometry and intensity settings (part of the cache name).

  Attributes:
    spatial_dims: 2 (slices) or 3 (volumes or patches).
    res: output side: slices ``[res, res]``, volumes/patches ``[res]*3``.
    slice_axis: ``axial``, ``coronal`` or ``sagittal`` (2D).
    volume_mode: 3D only: ``resize`` the cropped volume to ``res**3``, or cut
      ``patches`` of ``res**3`` voxels at the (resampled) voxel size.
    patch_stride: voxels between patch starts (0: ``res``, no overlap).
    target_spacing: ``(x, y, z)`` mm in RAS order to resample to; ``()``
      keeps the scanner's voxels.
    crop_foreground: crop to the bounding box of the foreground (in-plane for
      slices) before resizing.
    crop_margin: voxels kept around the foreground box.
    foreground_threshold: a voxel is foreground in a modality above this
      fraction of the volume's [p0.5, p99.5] range; the union over
      modalities is the subject's foreground.
    min_foreground: slices/patches with a smaller foreground fraction are
      dropped (empty-slice filtering; any value > 0 drops empty slices); 0
      keeps all.
    keep_aspect: pad to equal physical extents before resizing, so anatomy
      is not stretched; False stretches each axis to ``res``.
    volume_norm: per-volume normalisation over the foreground: ``auto``
      (``minmax`` for MR and other unitless modalities, ``none`` for CT,
      which stays in Hounsfield units), ``none``, ``zscore`` or ``minmax``
      (percentiles -> [0, 1]).
    volume_percentiles: percentiles of ``minmax`` volume normalisation.
  """

  spatial_dims: int = 2
  res: int = 64
  slice_axis: str = "axial"
  volume_mode: str = "resize"
  patch_stride: int = 0
  target_spacing: Tuple[float, ...] = ()
  crop_foreground: bool = True
  crop_margin: int = 2
  foreground_threshold: float = 0.05
  min_foreground: float = 0.05
  keep_aspect: bool = True
  volume_norm: str = "auto"
  volume_percentiles: Tuple[float, ...] = (0.5, 99.5)

  def problems(self) -> Sequence[str]:
    """Invalid values, as ``data.<key>`` messages."""
    out = []
    if self.spatial_dims not in (2, 3):
      out.append(f"data.spatial_dims={self.spatial_dims!r} must be 2 or 3")
    if not isinstance(self.res, int) or self.res < 2:
      out.append(f"data.res={self.res!r} must be an integer >= 2")
    if self.slice_axis not in preprocess.SLICE_AXES:
      out.append(f"data.slice_axis={self.slice_axis!r} must be one of "
                 f"{tuple(preprocess.SLICE_AXES)}")
    if self.volume_mode not in VOLUME_MODES:
      out.append(f"data.volume_mode={self.volume_mode!r} must be one of "
                 f"{VOLUME_MODES}")
    if self.patch_stride < 0:
      out.append(f"data.patch_stride={self.patch_stride} must be >= 0")
    if self.target_spacing and (len(self.target_spacing) != 3 or
                                min(self.target_spacing) <= 0):
      out.append(f"data.target_spacing={self.target_spacing!r} must be () "
                 "or three positive numbers (mm)")
    if not 0 <= self.foreground_threshold < 1:
      out.append(f"data.foreground_threshold={self.foreground_threshold} "
                 "must be in [0, 1)")
    if not 0 <= self.min_foreground <= 1:
      out.append(f"data.min_foreground={self.min_foreground} must be in "
                 "[0, 1]")
    if self.volume_norm not in VOLUME_NORMS:
      out.append(f"data.volume_norm={self.volume_norm!r} must be one of "
                 f"{VOLUME_NORMS}")
    return out

  @property
  def shape(self) -> Tuple[int, ...]:
    return (self.res,) * self.spatial_dims

  @property
  def patches(self) -> bool:
    return self.spatial_dims == 3 and self.volume_mode == "patches"


@dataclasses.dataclass(frozen=True)
class Scan:
  """One volume as read from disk, before any processing.

  Attributes:
    data: ``[X, Y, Z]`` voxel values (float32 for images, raw for masks).
    affine: voxel -> world (RAS mm) 4x4 matrix.
    path: where it came from (for error messages).
  """

  data: np.ndarray
  affine: np.ndarray
  path: str


def squeeze_3d(shape: Sequence[int], path: str) -> Tuple[int, ...]:
  """The 3D shape of a volume (trailing singleton dims dropped)."""
  shape = tuple(int(s) for s in shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise file_error(path, f"expected a 3D volume, got shape {shape}")
  return shape


def check_same_grid(ref: Tuple[Tuple[int, ...], np.ndarray, str],
                    other: Tuple[Tuple[int, ...], np.ndarray, str],
                    tol: float) -> None:
  """Co-registered volumes share shape and affine (within ``tol`` mm)."""
  (s0, a0, p0), (s1, a1, p1) = ref, other
  if tuple(s0) != tuple(s1):
    raise file_error(p1, f"shape {tuple(s1)} differs from {tuple(s0)} of "
                     f"{p0}; the volumes of a subject must be co-registered "
                     "on one voxel grid")
  diff = float(np.abs(np.asarray(a0) - np.asarray(a1)).max())
  if diff > tol:
    raise file_error(p1, f"affine differs from that of {p0} by up to "
                     f"{diff:.4g} mm (> data.affine_tol={tol:g}); the volumes "
                     "of a subject must be co-registered on one voxel grid")


def canonical(scan: Scan, reorient: bool) -> Tuple[np.ndarray, np.ndarray]:
  """``(data [X, Y, Z] in RAS order, voxel spacing (mm))``."""
  img = nib.Nifti1Image(scan.data, scan.affine)
  if reorient:
    img = nib.as_closest_canonical(img)
  return np.asarray(img.dataobj), np.asarray(img.header.get_zooms()[:3],
                                             np.float64)


def _check_image(x: np.ndarray, path: str) -> np.ndarray:
  bad = preprocess.non_finite_count(x)
  if bad:
    raise file_error(path, f"{bad} NaN/Inf voxels; fix or mask them before "
                     "building")
  return x.astype(np.float32)


def _fit(x: np.ndarray, spacing: Sequence[float], res: int, pad_value: float,
         keep_aspect: bool, nearest: bool) -> np.ndarray:
  """Pads to equal physical extents (optional) and resizes to ``res``."""
  if keep_aspect:
    x = preprocess.pad_to_extent(x, spacing, pad_value)
  return preprocess.resize(x, (res,) * x.ndim, nearest=nearest)


# Volumes whose bright end differs from the median volume's by more than this
# factor are named when volume_norm="none" leaves intensities as stored.
INTENSITY_SPREAD = 4.0


def bright_level(scan: Scan) -> float:
  """The 99.5th percentile of a volume's positive voxels (every 7th voxel:
  a level, not an exact statistic)."""
  x = np.asarray(scan.data, np.float32).ravel()[::7]
  x = x[np.isfinite(x) & (x > 0)]
  return float(np.percentile(x, 99.5)) if x.size else 0.0


def intensity_outliers(levels: Mapping[str, Mapping[str, float]],
                       skip: Sequence[str] = ()) -> List[str]:
  """``"subject modality (level vs median)"`` for every volume whose
  :func:`bright_level` is more than :data:`INTENSITY_SPREAD` times away
  from its modality's median; ``levels`` is ``{subject: {modality:
  level}}``, modalities in ``skip`` (CT, in HU) are not checked."""
  out = []
  modalities = sorted({m for v in levels.values() for m in v} - set(skip))
  for m in modalities:
    values = {s: v[m] for s, v in levels.items() if v.get(m, 0) > 0}
    if len(values) < 3:
      continue
    median = float(np.median(list(values.values())))
    for subject, level in sorted(values.items()):
      ratio = level / median
      if ratio > INTENSITY_SPREAD or ratio < 1 / INTENSITY_SPREAD:
        out.append(f"{subject} {m} ({level:.4g} vs median {median:.4g})")
  return out


def ct_names(levels: Mapping[str, Mapping[str, float]]) -> List[str]:
  """The modalities named as CT (``ct``, ``ct_arterial``, ...)."""
  return sorted({m for v in levels.values() for m in v
                 if m.lower().startswith("ct")})


def warn_intensity_outliers(levels: Mapping[str, Mapping[str, float]],
                            cfg: "VolumeSettings",
                            skip: Sequence[str] = ()) -> None:
  """Logs the :func:`intensity_outliers` of a data set built with
  ``volume_norm="none"`` (MR has no absolute units: volumes from other
  scanners come out nearly black or saturated; ``auto`` normalises them)."""
  if cfg.volume_norm != "none":
    return
  outliers = intensity_outliers(levels, skip)
  if outliers:
    logging.warning(
        "intensities differ more than %gx between volumes with "
        "data.volume_norm='none': %s; set data.volume_norm='auto' (or "
        "'zscore') to normalise each volume", INTENSITY_SPREAD,
        "; ".join(outliers[:10]) + (" ..." if len(outliers) > 10 else ""))


def volume_norm(cfg: VolumeSettings, modality: str,
                ct: Sequence[str]) -> str:
  """The per-volume normalisation of ``modality``: ``auto`` keeps CT (the
  modalities in ``ct``) in Hounsfield units and maps every other volume's
  foreground percentiles to [0, 1] (MR has no absolute units: scanners and
  protocols differ by orders of magnitude)."""
  if cfg.volume_norm != "auto":
    return cfg.volume_norm
  return "none" if modality in ct else "minmax"


def prepare_subject(images: Mapping[str, Scan], mask: Optional[Scan],
                    cfg: VolumeSettings, reorient: bool = True,
                    ct: Optional[Sequence[str]] = None
                    ) -> Tuple[Dict[str, np.ndarray], Optional[np.ndarray],
                               np.ndarray, Tuple[float, ...]]:
  """Reorients, resamples, normalises and orders volumes for display.

  Args:
    images: modality -> scan (all co-registered).
    mask: label map scan (uint8 after value mapping) or None.
    cfg: the geometry settings.
    reorient: to RAS (``nibabel.as_closest_canonical``).
    ct: the modalities in Hounsfield units (default: those named ``ct*``).

  Returns:
    ``(images {m: [S, R, C] float32}, mask [S, R, C] uint8 or None,
    foreground [S, R, C] bool, spacing (slice, row, col) mm)``.
  """
  out, spacing = {}, None
  for name, scan in images.items():
    data, zooms = canonical(scan, reorient)
    data = _check_image(data, scan.path)
    if cfg.target_spacing:
      data = preprocess.resample_spacing(data, zooms, cfg.target_spacing)
    out[name] = preprocess.to_display(data, cfg.slice_axis)
    spacing = zooms if spacing is None else spacing
  if cfg.target_spacing:
    spacing = np.asarray(cfg.target_spacing, np.float64)
  labels = None
  if mask is not None:
    labels, mask_zooms = canonical(mask, reorient)
    if cfg.target_spacing:
      labels = preprocess.resample_spacing(labels, mask_zooms,
                                           cfg.target_spacing, nearest=True)
    labels = preprocess.to_display(labels, cfg.slice_axis)
    first = next(iter(out.values()))
    if labels.shape != first.shape:  # both resampled from one grid.
      raise file_error(mask.path, f"label map shape {labels.shape} differs "
                       f"from image shape {first.shape} after resampling")
  fg = np.zeros(next(iter(out.values())).shape, bool)
  for x in out.values():
    fg |= preprocess.foreground(x, cfg.foreground_threshold)
  ct = ct_names({"": out}) if ct is None else ct
  out = {k: preprocess.normalize_volume(x, volume_norm(cfg, k, ct), fg,
                                        cfg.volume_percentiles)
         for k, x in out.items()}
  return (out, labels, fg,
          preprocess.display_spacing(spacing, cfg.slice_axis))


def _crop(arrays: Dict[str, np.ndarray], labels: Optional[np.ndarray],
          fg: np.ndarray, cfg: VolumeSettings, axes: Sequence[int]):
  box = list(preprocess.bbox(fg, cfg.crop_margin))
  for a in range(fg.ndim):
    if a not in axes:
      box[a] = slice(0, fg.shape[a])
  box = tuple(box)
  return ({k: v[box] for k, v in arrays.items()},
          None if labels is None else labels[box], fg[box])


def subject_examples(images: Mapping[str, Scan], mask: Optional[Scan],
                     cfg: VolumeSettings, *, subject: str, subject_id: int,
                     label: int, label_source: str, reorient: bool = True,
                     ct: Optional[Sequence[str]] = None
                     ) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """(key, example) pairs of one subject.

  Each example holds one float32 feature per modality (``[res, res]`` or
  ``[res]*3``), ``mask`` (uint8, if a label map is given), ``label`` (the
  subject's class, or with ``label_source="mask"`` whether the example shows
  any labelled voxel), ``subject_id``, ``subject`` and ``slice_index`` (-1
  for volumes and patches; patches also carry ``patch_origin``).
  """
  arrays, labels, fg, spacing = prepare_subject(images, mask, cfg, reorient,
                                                ct)
  if cfg.crop_foreground:
    axes = (1, 2) if cfg.spatial_dims == 2 else (0, 1, 2)
    arrays, labels, fg = _crop(arrays, labels, fg, cfg, axes)
  pad = {k: float(v.min()) for k, v in arrays.items()}

  def example(imgs, lab, slice_index, **extra):
    ex = dict(imgs, subject_id=np.int32(subject_id), subject=subject,
              slice_index=np.int32(slice_index), **extra)
    if lab is not None:
      ex["mask"] = lab.astype(np.uint8)
    if label_source == "mask":
      ex["label"] = int(lab is not None and bool((lab > 0).any()))
    else:
      ex["label"] = int(label)
    return ex

  if cfg.spatial_dims == 2:
    for s in range(fg.shape[0]):
      if fg[s].mean() < cfg.min_foreground:
        continue
      imgs = {k: _fit(v[s], spacing[1:], cfg.res, pad[k], cfg.keep_aspect,
                      False) for k, v in arrays.items()}
      lab = None if labels is None else _fit(
          labels[s], spacing[1:], cfg.res, 0, cfg.keep_aspect, True)
      yield f"{subject}_s{s:04d}", example(imgs, lab, s)
  elif not cfg.patches:
    imgs = {k: _fit(v, spacing, cfg.res, pad[k], cfg.keep_aspect, False)
            for k, v in arrays.items()}
    lab = None if labels is None else _fit(labels, spacing, cfg.res, 0,
                                           cfg.keep_aspect, True)
    yield subject, example(imgs, lab, -1)
  else:
    size, stride = cfg.res, cfg.patch_stride or cfg.res
    arrays = {k: preprocess.pad_to_min(v, size, pad[k])
              for k, v in arrays.items()}
    fg = preprocess.pad_to_min(fg, size, False)
    labels = None if labels is None else preprocess.pad_to_min(labels, size, 0)
    grids = np.meshgrid(*[preprocess.patch_starts(n, size, stride)
                          for n in fg.shape], indexing="ij")
    for i, origin in enumerate(zip(*[g.reshape(-1) for g in grids])):
      box = tuple(slice(o, o + size) for o in origin)
      if fg[box].mean() < cfg.min_foreground:
        continue
      yield (f"{subject}_p{i:05d}",
             example({k: v[box] for k, v in arrays.items()},
                     None if labels is None else labels[box], -1,
                     patch_origin=np.asarray(origin, np.int32)))


def check_mask_values(data: np.ndarray, values: Sequence[int], path: str
                      ) -> np.ndarray:
  """The label map as uint8 classes, or a :class:`DataError` naming ``path``."""
  labels, problem = preprocess.mask_to_labels(data, values)
  if labels is None:
    raise file_error(path, problem)
  return labels


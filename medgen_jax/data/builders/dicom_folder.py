"""TFDS builder for folders of DICOM series (CT, MR), with DICOM-SEG masks.

Every file under ``data.root`` is read (headers first); files that are not
DICOM are skipped unless their extension says they should be (``.dcm``).
Images are grouped by SeriesInstanceUID and series by subject (PatientID, or
``data.subject_tag``). ``data.series`` maps feature names to globs on the
SeriesDescription (case-insensitive); each subject needs exactly one
matching series per feature, and a subject's series must share one voxel
grid (checked), so several contrasts become co-registered channels.

A series is either classic (one file per slice) or enhanced (one
multi-frame file whose per-frame functional groups give each frame's
position, orientation, spacing and rescale). Slices are sorted by
ImagePositionPatient along the slice normal (the cross product of the
ImageOrientationPatient directions); duplicated positions and gaps (a
missing slice) are errors, checked only for the series the config selects.
RescaleSlope/RescaleIntercept are applied per slice, so CT is in Hounsfield
units; CT windows are applied in the input pipeline
(``data.contrasts=("ct:brain",)`` or ``data.windows``). A DICOM-SEG object
referencing a selected series becomes the ``mask`` feature (voxel = segment
number; a later segment wins where segments overlap); frames are matched to
slices by ReferencedSOPInstanceUID (and ReferencedFrameNumber), or by
position when a frame has none. Volumes then go through
:mod:`medgen_jax.data.volumes` (RAS, resampling, slices / volumes /
patches), as NIfTI volumes do.

2D images (radiographs, mammograms, ultrasound, cine loops: no slice
geometry) are read by the ``image_folder`` builder.
"""

import dataclasses
import fnmatch
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pydicom
import tensorflow_datasets as tfds
from absl import logging
from pydicom.errors import InvalidDicomError

from medgen_jax.data import builder_lib
from medgen_jax.data import dicom_images
from medgen_jax.data import volumes
from medgen_jax.data.builder_lib import DataError, file_error

NAME = "dicom_folder"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
MASK_MODES = ("auto", "none")
_REQUIRED = ("root",)
_IMAGE_TAGS = ("SeriesInstanceUID", "SOPInstanceUID", "ImagePositionPatient",
               "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


@dataclasses.dataclass(frozen=True)
class DicomSettings:
  """What determines the built data set (hashed into its name).

  Attributes:
    root: the folder (absolute), searched recursively.
    series: feature name -> SeriesDescription glob.
    image_filter: DICOM attribute -> value (a glob for text) every image
      must have to be read at all, e.g. ``{"EchoNumbers": 1}`` or
      ``{"ImageType": "*M*"}``: picks one echo, time point or the
      magnitude images out of a 4D series before anything is checked.
    mask: ``auto`` (DICOM-SEG label maps when present) or ``none``.
    subject_tag: the DICOM attribute naming a subject.
    skip_incomplete: skip (and log) subjects lacking a series instead of
      failing.
    split_seed, split_fractions: the random subject split.
    labels: class-label settings.
    volume: geometry and intensity settings.
  """

  root: str
  series: Dict[str, str]
  image_filter: Dict[str, Any] = dataclasses.field(default_factory=dict)
  mask: str = "auto"
  subject_tag: str = "PatientID"
  skip_incomplete: bool = False
  split_seed: int = 0
  split_fractions: Tuple[float, ...] = builder_lib.DEFAULT_SPLIT_FRACTIONS
  labels: builder_lib.LabelSettings = builder_lib.LabelSettings()
  volume: volumes.VolumeSettings = volumes.VolumeSettings()


@dataclasses.dataclass(frozen=True)
class Slice:
  """One image file of a series (header values only)."""

  path: str
  sop_uid: str
  position: np.ndarray   # ImagePositionPatient (LPS mm)
  orientation: np.ndarray  # ImageOrientationPatient (6 cosines)
  spacing: Tuple[float, float]  # PixelSpacing (row, column) mm
  shape: Tuple[int, int]  # (Rows, Columns)
  # The attributes that tell the images of a 4D series apart.
  dims: Tuple[Tuple[str, str], ...] = ()
  # Enhanced multi-frame images: the frame (0-based) and its own
  # (RescaleSlope, RescaleIntercept); -1 and None for one image per file.
  frame: int = -1
  rescale: Optional[Tuple[float, float]] = None

  @property
  def key(self) -> str:
    """The instance (and frame) a DICOM-SEG frame refers to."""
    return self.sop_uid if self.frame < 0 else f"{self.sop_uid}#{self.frame + 1}"


@dataclasses.dataclass(frozen=True)
class Series:
  """An image series sorted along its slice normal."""

  uid: str
  description: str
  subject: str
  slices: Tuple[Slice, ...]
  modality: str = ""
  # Why the series cannot be a volume (e.g. 2D images without geometry);
  # raised only when the config selects it.
  problem: Optional[Tuple[str, str]] = None  # (path, message)

  @property
  def folder(self) -> str:
    return os.path.dirname(self.slices[0].path)


@dataclasses.dataclass(frozen=True)
class Seg:
  """A DICOM-SEG object (header values only)."""

  path: str
  series_uid: str  # the referenced image series


@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  series: Dict[str, Series]
  seg: Optional[Seg]


# ----------------------------------------------------------------- config ---


def settings(data_cfg) -> DicomSettings:
  root = os.path.abspath(os.path.expanduser(str(data_cfg.get("root", ""))))
  return builder_lib.settings_from(
      DicomSettings, data_cfg, root=root,
      series=dict(builder_lib.plain(data_cfg.get("series", {"ct": "*"}))),
      image_filter=dict(builder_lib.plain(data_cfg.get("image_filter", {}))),
      labels=builder_lib.settings_from(builder_lib.LabelSettings, data_cfg),
      volume=builder_lib.settings_from(volumes.VolumeSettings, data_cfg))


def _optional_keys() -> Tuple[str, ...]:
  own = [f.name for f in dataclasses.fields(DicomSettings)
         if f.name not in _REQUIRED + ("labels", "volume")]
  return tuple(own + [f.name for f in dataclasses.fields(
      builder_lib.LabelSettings)] + [f.name for f in dataclasses.fields(
          volumes.VolumeSettings)])


def validate_config(data_cfg) -> List[str]:
  """Problems of a ``dicom_folder`` data section, one message each."""
  errors = builder_lib.check_keys(data_cfg, NAME, _REQUIRED, _optional_keys())
  if errors:
    return errors
  try:
    s = settings(data_cfg)
  except (TypeError, ValueError) as e:
    return [f"data: {e}"]
  if not s.series:
    errors.append("data.series is empty: map feature names to "
                  "SeriesDescription globs, e.g. {'ct': '*'}")
  if s.mask not in MASK_MODES:
    errors.append(f"data.mask={s.mask!r} must be one of {MASK_MODES}")
  errors += s.volume.problems()
  errors += s.labels.problems(s.mask == "auto")
  errors += builder_lib.check_contrasts(data_cfg.contrasts, tuple(s.series),
                                        NAME)
  errors += builder_lib.check_num_classes(data_cfg, s.labels.names())
  return errors


# ---------------------------------------------------------------- headers ---


def _read_header(path: str) -> Optional[pydicom.Dataset]:
  """The header, None for a non-DICOM file (unless it has a DICOM suffix)."""
  try:
    return pydicom.dcmread(path, stop_before_pixels=True)
  except InvalidDicomError as e:
    if path.lower().endswith(dicom_images.DICOM_SUFFIXES):
      raise file_error(path, f"not a valid DICOM file ({e})") from None
    return None
  except Exception as e:  # truncated headers raise many types.
    raise file_error(path, f"corrupt or truncated DICOM header "
                     f"({builder_lib.describe(e)})") from None


def _tag(ds: pydicom.Dataset, name: str, path: str) -> Any:
  value = ds.get(name)
  if value is None or value == "":
    raise file_error(path, f"DICOM attribute {name} is missing")
  return value


def _slice(ds: pydicom.Dataset, path: str) -> Slice:
  """A classic (one image per file) slice from its header."""
  if ds.get("ImagePositionPatient") in (None, ""):
    raise file_error(path, (
        f"no ImagePositionPatient: a 2D image (Modality "
        f"{ds.get('Modality', '?')}: radiograph, mammogram, ultrasound, "
        "secondary capture) or a slice without geometry; read 2D DICOM "
        "images with the image_folder builder"))
  for name in _IMAGE_TAGS:
    _tag(ds, name, path)
  return Slice(path, str(ds.SOPInstanceUID),
               np.asarray(ds.ImagePositionPatient, np.float64),
               np.asarray(ds.ImageOrientationPatient, np.float64),
               tuple(float(v) for v in ds.PixelSpacing),
               (int(ds.Rows), int(ds.Columns)),
               tuple((k, _text(ds.get(k))) for k in FOURTH_DIMENSION
                     if ds.get(k) not in (None, "")))


class FrameAttributes:
  """A frame's attributes: those of its functional groups (its own, then
  the shared ones) over the file's, for :func:`passes`."""

  def __init__(self, own: Dict[str, Any], ds: pydicom.Dataset):
    self._own, self._ds = own, ds

  def get(self, name: str, default: Any = None) -> Any:
    if name in self._own:
      return self._own[name]
    return self._ds.get(name, default)


# Per-frame attributes of enhanced images: (functional group, attribute).
_FRAME_ATTRIBUTES = (
    ("FrameContentSequence", "TemporalPositionIndex"),
    ("FrameContentSequence", "StackID"),
    ("MREchoSequence", "EffectiveEchoTime"),
    ("MRDiffusionSequence", "DiffusionBValue"),
    ("MRImageFrameTypeSequence", "FrameType"),
    ("CTImageFrameTypeSequence", "FrameType"),
)


def frame_slices(ds: pydicom.Dataset, path: str
                 ) -> List[Tuple[Slice, FrameAttributes]]:
  """The frames of an enhanced multi-frame image as slices.

  Raises:
    DataError: a multi-frame file without per-frame geometry (a cine
      loop), or a frame without position, orientation or pixel spacing.
  """
  n = dicom_images.num_frames(ds)
  groups = ds.get("PerFrameFunctionalGroupsSequence") or []
  shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
  if not groups:
    raise file_error(path, (
        f"{n} frames without per-frame functional groups (a cine loop or "
        "a 2D multi-frame image, not a volume): read it with the "
        "image_folder builder (data.dicom_frames='split')"))
  if len(groups) != n:
    raise file_error(path, f"{len(groups)} per-frame functional groups for "
                     f"{n} frames")
  shape = (int(_tag(ds, "Rows", path)), int(_tag(ds, "Columns", path)))
  sop = str(_tag(ds, "SOPInstanceUID", path))
  out = []
  for f, g in enumerate(groups):

    def item(group: str, name: str, required: bool = True):
      seq = _functional_group(g, shared, group) or []
      value = seq[0].get(name) if seq else None
      if required and value in (None, ""):
        raise file_error(path, f"frame {f + 1} has no {name} (in its "
                         f"per-frame or the shared {group})")
      return value

    slope = item("PixelValueTransformationSequence", "RescaleSlope", False)
    intercept = item("PixelValueTransformationSequence", "RescaleIntercept",
                     False)
    own = {name: item(group, name, False)
           for group, name in _FRAME_ATTRIBUTES}
    own = {k: v for k, v in own.items() if v not in (None, "")}
    sl = Slice(path, sop,
               np.asarray(item("PlanePositionSequence",
                               "ImagePositionPatient"), np.float64),
               np.asarray(item("PlaneOrientationSequence",
                               "ImageOrientationPatient"), np.float64),
               tuple(float(v) for v in item("PixelMeasuresSequence",
                                            "PixelSpacing")),
               shape, tuple((k, _text(v)) for k, v in own.items()), f,
               (float(1.0 if slope in (None, "") else slope),
                float(0.0 if intercept in (None, "") else intercept)))
    out.append((sl, FrameAttributes(own, ds)))
  return out


# Attributes whose values tell apart images at one position: echoes, time
# points, magnitude/phase, b-values, repeated acquisitions.
FOURTH_DIMENSION = ("EchoNumbers", "EchoTime", "EffectiveEchoTime",
                    "TemporalPositionIdentifier", "TemporalPositionIndex",
                    "TriggerTime", "ImageType", "FrameType",
                    "DiffusionBValue", "AcquisitionNumber", "StackID")


def _text(value: Any) -> str:
  if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
    return "\\".join(str(v) for v in value)
  return str(value)


def passes(ds: Any, image_filter: Dict[str, Any]) -> bool:
  """Whether an image (a dataset, or a frame's :class:`FrameAttributes`)
  has every attribute value of ``image_filter`` (text values as
  case-insensitive globs, numbers compared as numbers)."""
  for name, want in image_filter.items():
    got = ds.get(name)
    if got is None:
      return False
    if isinstance(want, (int, float)) and not isinstance(want, bool):
      try:
        if float(_text(got).split("\\")[0]) != float(want):
          return False
      except ValueError:
        return False
    elif not fnmatch.fnmatch(_text(got).lower(), str(want).lower()):
      return False
  return True


def _fourth_dimension(a: Slice, b: Slice) -> str:
  """Why two images share a position: the attributes that differ."""
  da, db = dict(a.dims), dict(b.dims)
  differ = [k for k in FOURTH_DIMENSION if da.get(k) != db.get(k)]
  if not differ:
    return ""
  kinds = {"EchoNumbers": "multi-echo", "EchoTime": "multi-echo",
           "EffectiveEchoTime": "multi-echo",
           "TemporalPositionIdentifier": "4D (time points)",
           "TemporalPositionIndex": "4D (time points)",
           "TriggerTime": "4D (time points)",
           "ImageType": "mixed image types (e.g. magnitude and phase)",
           "FrameType": "mixed image types (e.g. magnitude and phase)",
           "DiffusionBValue": "diffusion-weighted (several b-values)",
           "AcquisitionNumber": "repeated acquisitions",
           "StackID": "several stacks"}
  k = differ[0]
  return (f"the series is {kinds[k]}: {k} is {da.get(k)!r} here and "
          f"{db.get(k)!r} there; select one with data.image_filter="
          f"{{{k!r}: {db.get(k)!r}}}")


def slice_normal(orientation: np.ndarray) -> np.ndarray:
  return np.cross(orientation[:3], orientation[3:])


def sort_slices(slices: Sequence[Slice]) -> Tuple[Slice, ...]:
  """Sorted along the normal; checks a consistent, gap-free geometry.

  Raises:
    DataError: differing orientation/size/spacing, a duplicated position,
      or uneven spacing (a missing slice).
  """
  ref = slices[0]
  for s in slices[1:]:
    if not np.allclose(s.orientation, ref.orientation, atol=1e-4):
      raise file_error(s.path, f"ImageOrientationPatient {s.orientation} "
                       f"differs from {ref.orientation} of {ref.path}")
    if s.shape != ref.shape or not np.allclose(s.spacing, ref.spacing,
                                               atol=1e-4):
      raise file_error(s.path, f"{s.shape} pixels of {s.spacing} mm differ "
                       f"from {ref.shape} of {ref.spacing} mm in {ref.path}")
  normal = slice_normal(ref.orientation)
  order = sorted(slices, key=lambda s: float(s.position @ normal))
  depth = np.asarray([s.position @ normal for s in order])
  if len(order) > 1:
    # The slices must be stacked along their normal; a CT acquired with a
    # tilted gantry steps sideways too, and stacking it would shear the
    # anatomy.
    step = order[-1].position - order[0].position
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-9)
    tilt = float(np.degrees(np.arccos(min(cos, 1.0))))
    if tilt > 0.5:
      raise file_error(order[-1].path, (
          f"the slices step {tilt:.1f} degrees off their normal (gantry "
          "tilt): stacking them would shear the anatomy; resample the "
          "series to an untilted grid (dcm2niix corrects gantry tilt) and "
          "use nifti_folder"))
    gaps = np.diff(depth)
    i = int(np.argmin(gaps))
    if gaps[i] < 1e-3:
      why = _fourth_dimension(order[i + 1], order[i])
      raise file_error(order[i + 1].path, f"same slice position as "
                       f"{order[i].path}: " +
                       (why or "duplicate instance?"))
    med = float(np.median(gaps))
    j = int(np.argmax(np.abs(gaps - med)))
    if abs(gaps[j] - med) > 0.1 * med:
      raise file_error(order[j + 1].path, (
          f"slice spacing {gaps[j]:.3g} mm to {order[j].path} differs from "
          f"the series' {med:.3g} mm (missing slice?)"))
  return tuple(order)


def series_grid(series: Series) -> Tuple[Tuple[int, ...], np.ndarray, str]:
  """``(shape [cols, rows, slices], RAS affine, path)`` from the headers.

  Voxel ``(i, j, k)`` is column ``i``, row ``j`` of slice ``k``; DICOM
  patient coordinates are LPS, so x and y flip for RAS.
  """
  s0 = series.slices[0]
  o = s0.orientation
  normal = slice_normal(o)
  step = (float(np.median(np.diff([s.position @ normal
                                   for s in series.slices])))
          if len(series.slices) > 1 else 1.0)
  lps = np.eye(4)
  lps[:3, 0] = o[:3] * s0.spacing[1]
  lps[:3, 1] = o[3:] * s0.spacing[0]
  lps[:3, 2] = normal * step
  lps[:3, 3] = s0.position
  shape = (s0.shape[1], s0.shape[0], len(series.slices))
  return shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, s0.path


def list_files(s: DicomSettings) -> List[str]:
  """Every file under ``s.root`` (relative paths), DICOMDIR excluded."""
  root = builder_lib.require_dir(s.root)
  files = [f for f in builder_lib.walk_files(root)
           if os.path.basename(f).upper() != "DICOMDIR"]
  if not files:
    raise DataError(f"{root}: empty folder (no files)")
  return files


def scan_folder(s: DicomSettings, files: Sequence[str]
                ) -> Tuple[List[Series], List[Seg]]:
  """All image series and SEG objects among ``files`` (headers only)."""
  root = s.root
  groups: Dict[str, List[Slice]] = {}
  info: Dict[str, Tuple[str, str, str]] = {}
  problems: Dict[str, Tuple[str, str]] = {}
  segs = []
  for rel in files:
    path = os.path.join(root, rel)
    ds = _read_header(path)
    if ds is None:
      continue
    if ds.get("SOPClassUID") == SEG_SOP_CLASS or ds.get("Modality") == "SEG":
      refs = ds.get("ReferencedSeriesSequence") or []
      if not refs:
        raise file_error(path, "DICOM-SEG without ReferencedSeriesSequence")
      segs.append(Seg(path, str(refs[0].SeriesInstanceUID)))
      continue
    if "PixelData" not in ds and ds.get("Rows") is None:
      continue  # e.g. structured reports or presentation states.
    # Frames of an enhanced file are filtered one by one (below).
    if dicom_images.num_frames(ds) == 1 and not passes(ds, s.image_filter):
      continue
    uid = str(_tag(ds, "SeriesInstanceUID", path))
    info[uid] = (str(ds.get("SeriesDescription", "")),
                 str(_tag(ds, s.subject_tag, path)),
                 str(ds.get("Modality", "")))
    group = groups.setdefault(uid, [])
    # A series that cannot be a volume (a 2D image, a cine loop) is named
    # only if the config selects it: a dose report or a screenshot beside
    # the CT must not stop the folder.
    try:
      if dicom_images.num_frames(ds) > 1:
        group += [sl for sl, attrs in frame_slices(ds, path)
                  if passes(attrs, s.image_filter)]
      else:
        group.append(_slice(ds, path))
    except DataError as e:
      problems.setdefault(uid, (path, str(e)))
  if not groups:
    raise DataError(f"{root}: no DICOM image series found ({len(files)} "
                    "files)" + (f" whose images pass data.image_filter="
                                f"{s.image_filter}" if s.image_filter
                                else ""))
  # Sorted and checked only once selected: a series the config does not
  # use (a 4D one, a scout) must not stop the folder.
  series = [Series(uid, info[uid][0], info[uid][1], tuple(sl), info[uid][2],
                   problems.get(uid))
            for uid, sl in sorted(groups.items())]
  return series, segs


def find_subjects(s: DicomSettings,
                  files: Optional[Sequence[str]] = None) -> List[Subject]:
  """Selected series (and SEG) per subject; checks presence, not pixels."""
  all_series, segs = scan_folder(s, list_files(s) if files is None else files)
  by_subject: Dict[str, List[Series]] = {}
  for x in all_series:
    by_subject.setdefault(x.subject, []).append(x)
  seg_of: Dict[str, List[Seg]] = {}
  for g in segs:
    seg_of.setdefault(g.series_uid, []).append(g)
  subjects = []
  for name, group in sorted(by_subject.items()):
    chosen = {}
    for feature, pattern in s.series.items():
      hits = [x for x in group
              if fnmatch.fnmatch(x.description.lower(), pattern.lower())]
      if not hits:
        msg = (f"missing series {feature!r} for subject {name!r}: no "
               f"SeriesDescription matches {pattern!r} (has "
               f"{sorted(x.description for x in group)})")
        if not s.skip_incomplete:
          raise file_error(group[0].folder, msg + " (set data.skip_incomplete"
                           "=True to skip such subjects)")
        logging.warning("skipping subject: %s", msg)
        break
      if len(hits) > 1:
        raise file_error(hits[0].folder, (
            f"{len(hits)} series of subject {name!r} match {feature!r} "
            f"pattern {pattern!r}: {[(x.description, x.folder) for x in hits]}"
            "; make data.series more specific or set data.subject_tag="
            "'StudyInstanceUID'"))
      if hits[0].problem:
        raise DataError(hits[0].problem[1])
      if not hits[0].slices:
        raise file_error(hits[0].folder, f"no frame of series {feature!r} "
                         f"passes data.image_filter={s.image_filter}")
      chosen[feature] = dataclasses.replace(
          hits[0], slices=sort_slices(hits[0].slices))
    if len(chosen) < len(s.series):
      continue
    found = [g for x in chosen.values() for g in seg_of.get(x.uid, [])]
    if len(found) > 1:
      raise file_error(found[1].path, f"second DICOM-SEG for subject {name!r} "
                       f"(also {found[0].path}); keep one per subject")
    subjects.append(Subject(name, chosen,
                            found[0] if found and s.mask == "auto" else None))
  with_seg = [x.name for x in subjects if x.seg]
  if with_seg and len(with_seg) < len(subjects):
    lacking = next(x for x in subjects if not x.seg)
    raise file_error(next(iter(lacking.series.values())).folder, (
        f"no DICOM-SEG for subject {lacking.name!r} while {len(with_seg)} "
        "other subjects have one; add it, or set data.mask='none'"))
  return subjects


# ------------------------------------------------------------------ pixels --


def read_series(series: Series) -> volumes.Scan:
  """The series as a float32 volume ``[cols, rows, slices]`` (HU for CT)."""
  shape, affine, _ = series_grid(series)
  vol = np.empty(shape, np.float32)
  files: Dict[str, Tuple[pydicom.Dataset, np.ndarray]] = {}
  for k, sl in enumerate(series.slices):
    if sl.path not in files:  # an enhanced file holds many slices.
      files[sl.path] = dicom_images.read_pixels(sl.path)
    ds, pixels = files[sl.path]
    if sl.frame >= 0:
      frames = dicom_images.num_frames(ds)
      pixels = pixels.reshape(frames, *pixels.shape[-2:])[sl.frame]
      slope, intercept = sl.rescale
    else:
      files.pop(sl.path)
      slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
      intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    if pixels.shape != sl.shape:
      raise file_error(sl.path, f"pixel array {pixels.shape} does not match "
                       f"Rows x Columns {sl.shape}")
    vol[:, :, k] = (pixels.astype(np.float32) * slope + intercept).T
  return volumes.Scan(vol, affine, series.folder)


def read_seg(seg: Seg, series: Series) -> Tuple[volumes.Scan, Dict[int, str]]:
  """The SEG on the series' grid: voxel = segment number (0: none).

  Returns:
    ``(label map scan, {segment number: label})``.
  """
  ds, frames = dicom_images.read_pixels(seg.path)
  shape, affine, _ = series_grid(series)
  n = int(ds.get("NumberOfFrames", 1) or 1)
  frames = frames.reshape(n, *frames.shape[-2:])
  if frames.shape[1:] != series.slices[0].shape:
    raise file_error(seg.path, f"frames of {frames.shape[1:]} pixels do not "
                     f"match the {series.slices[0].shape} of series "
                     f"{series.folder}")
  if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
    frames = frames > float(ds.get("MaximumFractionalValue", 255)) / 2
  segments = {int(x.SegmentNumber): str(x.get("SegmentLabel", ""))
              for x in ds.get("SegmentSequence", [])}
  groups = ds.get("PerFrameFunctionalGroupsSequence") or []
  # The standard lets any functional group sit in the shared sequence when
  # it is the same for every frame (highdicom writes the segment there for
  # a single-segment SEG): a frame's own group first, then the shared one.
  shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
  if len(groups) != n:
    raise file_error(seg.path, f"{len(groups)} per-frame functional groups "
                     f"for {n} frames")
  by_sop = {s.key: k for k, s in enumerate(series.slices)}
  normal = slice_normal(series.slices[0].orientation)
  depth = np.asarray([s.position @ normal for s in series.slices])
  step = float(np.median(np.diff(depth))) if len(depth) > 1 else 1.0
  labels = np.zeros(shape, np.uint8)
  order = []
  for f, g in enumerate(groups):
    try:
      ident = _functional_group(g, shared, "SegmentIdentificationSequence")
      number = int(ident[0].ReferencedSegmentNumber)
    except (AttributeError, IndexError, TypeError):
      raise file_error(seg.path, f"frame {f + 1} has no "
                       "ReferencedSegmentNumber (in its per-frame or the "
                       "shared functional groups)") from None
    if number not in segments or not 0 < number < 256:
      raise file_error(seg.path, f"frame {f + 1} refers to unknown segment "
                       f"{number} (SegmentSequence has {sorted(segments)})")
    order.append((number, f, _frame_slice(seg.path, f, g, shared, by_sop,
                                          depth, normal, step)))
  for number, f, k in sorted(order):  # higher segment numbers win overlaps.
    labels[:, :, k] = np.where(frames[f].T > 0, np.uint8(number),
                               labels[:, :, k])
  return volumes.Scan(labels, affine, seg.path), segments


def _functional_group(group, shared, name: str):
  """Functional group ``name`` of a frame: its own, else the shared one
  (``None`` when neither has it)."""
  own = group.get(name)
  if own:
    return own
  return shared.get(name) if shared is not None else None


def _frame_slice(path: str, f: int, group, shared, by_sop: Dict[str, int],
                 depth: np.ndarray, normal: np.ndarray, step: float) -> int:
  """Slice index of SEG frame ``f``: by referenced SOP, else by position."""
  for der in _functional_group(group, shared,
                               "DerivationImageSequence") or []:
    for src in der.get("SourceImageSequence") or []:
      uid = str(src.get("ReferencedSOPInstanceUID", ""))
      frame = src.get("ReferencedFrameNumber")
      key = f"{uid}#{int(frame)}" if frame not in (None, "") else uid
      if key in by_sop:
        return by_sop[key]
      if uid and not any(k.startswith(uid + "#") for k in by_sop):
        raise file_error(path, f"frame {f + 1} references SOP instance "
                         f"{uid}, which is not in the image series")
  planes = _functional_group(group, shared, "PlanePositionSequence") or []
  if not planes:
    raise file_error(path, f"frame {f + 1} has neither a source image nor "
                     "a plane position")
  d = float(np.asarray(planes[0].ImagePositionPatient, np.float64) @ normal)
  k = int(np.argmin(np.abs(depth - d)))
  if abs(depth[k] - d) > 0.5 * abs(step):
    raise file_error(path, f"frame {f + 1} at {d:.2f} mm along the normal "
                     "lies on no slice of the image series")
  return k


def ct_features(subject: Subject) -> List[str]:
  """The subject's features in Hounsfield units: CT series (by Modality,
  or by a feature name ``ct*``)."""
  return sorted(f for f, x in subject.series.items()
                if x.modality.upper() == "CT" or f.lower().startswith("ct"))


# ----------------------------------------------------------------- builder --


def _features(s: DicomSettings, has_mask: bool) -> tfds.features.FeaturesDict:
  v = s.volume
  feats = builder_lib.image_features(s.series, v.shape,
                                     ("mask",) if has_mask else ())
  feats["label"] = tfds.features.ClassLabel(names=list(s.labels.names()))
  feats.update(builder_lib.id_features())
  if v.patches:
    feats["patch_origin"] = tfds.features.Tensor(shape=(3,), dtype=np.int32)
  return tfds.features.FeaturesDict(feats)


class DicomFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """DICOM series per subject (+ DICOM-SEG), as slices, volumes or patches."""

  VERSION = tfds.core.Version(builder_lib.VERSION)
  RELEASE_NOTES = {builder_lib.VERSION: "Initial release."}

  def __init__(self, *, settings: DicomSettings, has_mask: bool,  # pylint: disable=redefined-outer-name
               subjects: Sequence[Subject] = (), **kwargs):
    self._settings = settings
    self._levels: Dict[str, Dict[str, float]] = {}
    self._num_subjects = 0
    self._has_mask = has_mask
    self._subjects = tuple(subjects)
    super().__init__(file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._settings
    return self.dataset_info_from_configs(
        description=(f"DICOM series from {s.root} ({sorted(s.series)}), "
                     "split by subject."),
        features=_features(s, self._has_mask),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    s = self._settings
    for subject in self._subjects:  # geometry first: fail before writing.
      grids = [series_grid(x) for x in subject.series.values()]
      for g in grids[1:]:
        volumes.check_same_grid(grids[0], g, tol=1e-3)
    names = [x.name for x in self._subjects]
    labels, explicit = builder_lib.subject_labels(s.labels, names, s.root)
    splits = builder_lib.assign_splits(names, s.split_seed, s.split_fractions,
                                       explicit, source=s.root)
    self.info.metadata.update(subjects={k: list(v) for k, v in splits.items()},
                              root=s.root, segments={})
    by_name = {x.name: x for x in self._subjects}
    ids = {n: i for i, n in enumerate(sorted(names))}
    # Every volume's bright level, checked once all splits are written.
    self._levels, self._num_subjects = {}, len(names)
    return {split: self._generate_examples(split, [by_name[n] for n in sel],
                                           labels, ids)
            for split, sel in splits.items()}

  def _generate_examples(self, split, subjects, labels, ids):
    s = self._settings
    count = 0
    for subject in subjects:
      images = {f: read_series(x) for f, x in subject.series.items()}
      self._levels[subject.name] = {m: volumes.bright_level(x)
                                    for m, x in images.items()}
      ct = ct_features(subject)
      mask = None
      if subject.seg:
        ref = next(x for x in subject.series.values()
                   if x.uid == subject.seg.series_uid)
        mask, segments = read_seg(subject.seg, ref)
        for k, v in segments.items():
          self.info.metadata["segments"].setdefault(str(k), v)
      for key, ex in volumes.subject_examples(
          images, mask, s.volume, subject=subject.name,
          subject_id=ids[subject.name], label=labels[subject.name],
          label_source=s.labels.label_source, ct=ct):
        count += 1
        yield key, ex
    builder_lib.require_examples(
        count, split, f"subjects {[x.name for x in subjects]} gave no "
        "slices/patches above data.min_foreground; lower it")
    if len(self._levels) == self._num_subjects:
      # CT is in Hounsfield units: its levels are meant to be absolute.
      volumes.warn_intensity_outliers(
          self._levels, s.volume, skip=sorted(
              set(volumes.ct_names(self._levels)).union(
                  *(ct_features(x) for x in self._subjects))))


def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The builder of ``data_cfg`` (builds nothing).

  Its name hashes the settings and every file under the root (paths, sizes,
  modification times); when that data set exists it is opened directly,
  otherwise every header is read and checked.
  """
  errors = validate_config(data_cfg)
  if errors:
    raise ValueError("invalid dicom_folder config:\n  - " +
                     "\n  - ".join(errors))
  s = settings(data_cfg)
  files = list_files(s)
  paths = [os.path.join(s.root, f) for f in files]
  if s.labels.labels_csv:
    csv_path = builder_lib.resolve_path(s.labels.labels_csv, s.root)
    paths += [csv_path] if os.path.isfile(csv_path) else []
  name = builder_lib.config_name(os.path.basename(s.root), s,
                                 builder_lib.source_fingerprint(paths))
  done = builder_lib.prepared_builder(data_cfg.data_dir, NAME, name)
  if done is not None:
    return done
  subjects = find_subjects(s, files)
  has_mask = any(x.seg for x in subjects)
  if s.labels.label_source == "mask" and not has_mask:
    raise DataError(f"{s.root}: data.label_source='mask' but no series has "
                    "a DICOM-SEG")
  config = builder_lib.FolderConfig(
      name=name, version=builder_lib.VERSION,
      description=f"{len(subjects)} subjects from {s.root}",
      settings=builder_lib.settings_json(s))
  return DicomFolder(settings=s, has_mask=has_mask, subjects=subjects,
                     config=config, data_dir=str(data_cfg.data_dir))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """:func:`load_builder`, building the data set first if it is missing."""
  return builder_lib.build(load_builder(data_cfg), str(data_cfg.data_dir))

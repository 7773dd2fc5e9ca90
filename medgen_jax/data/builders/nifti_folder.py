"""TFDS builder for folders of 3D volumes (BraTS-, IXI-like layouts).

Volumes are read by file extension (:mod:`medgen_jax.data.volume_files`):
NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, detached ``.nhdr``; 3D
Slicer's volumes and ``.seg.nrrd`` segmentations) and MetaImage (``.mha``,
``.mhd`` with its ``.raw``/``.zraw``), images and label maps alike; a
subject may mix formats, since all are placed in RAS.

Files are found by one path pattern per modality (and one for the label map),
relative to ``data.root``. ``{subject}`` marks the subject name, ``*`` any
characters within a path component, ``**/`` any sub-folders::

  BraTS-like   root/BraTS2021_00000/BraTS2021_00000_t1.nii.gz
               modalities={"t1": "{subject}/*_t1.nii.gz", ...}
               mask="{subject}/*_seg.nii.gz"
  IXI-like     root/T1/IXI002-Guys-0828-T1.nii.gz, root/T2/IXI002-...-T2.nii.gz
               modalities={"t1": "T1/{subject}-T1.nii.gz",
                           "t2": "T2/{subject}-T2.nii.gz"}
  Slicer-like  root/case01/T1.nrrd, root/case01/Segmentation.seg.nrrd
               modalities={"t1": "{subject}/T1.nrrd"},
               mask="{subject}/*.seg.nrrd"

Every subject needs exactly one file per modality. The volumes of a subject
must be co-registered (same shape, same affine within ``data.affine_tol``
mm); they are reoriented to RAS, optionally resampled to
``data.target_spacing`` and turned into 2D slices, 3D volumes or 3D patches
(:mod:`medgen_jax.data.volumes`). Splits are by subject.

Usage::

  config.data = common.nifti_data_config(
      root="/data/brats", modalities={"t1": "{subject}/*_t1.nii.gz"},
      mask="{subject}/*_seg.nii.gz", mask_values=(0, 1, 2, 4), res=64)
  builder = prepare(config.data)
"""

import dataclasses
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medgen_jax.data import builder_lib
from medgen_jax.data import volume_files
from medgen_jax.data import volumes
from medgen_jax.data.builder_lib import DataError, file_error

NAME = "nifti_folder"

_REQUIRED = ("root", "modalities")


@dataclasses.dataclass(frozen=True)
class NiftiSettings:
  """Everything that determines the built data set (hashed into its name).

  Attributes:
    root: the data folder (absolute).
    modalities: feature name -> path pattern with ``{subject}``.
    mask: path pattern of the label map ("" for none).
    mask_values: allowed label values, stored as their index (e.g. BraTS
      ``(0, 1, 2, 4)`` -> 0..3); ``()`` keeps values 0..255 as they are.
    reorient: reorient to RAS with ``nibabel.as_closest_canonical``.
    affine_tol: largest allowed affine difference (mm) between the volumes
      of one subject.
    skip_incomplete: skip (and log) subjects lacking a modality or label map
      instead of failing.
    split_seed: seed of the random subject split.
    split_fractions: train/val/test fractions of subjects.
    labels: class-label settings.
    volume: geometry and intensity settings.
  """

  root: str
  modalities: Dict[str, str]
  mask: str = ""
  mask_values: Tuple[int, ...] = ()
  reorient: bool = True
  affine_tol: float = 1e-3
  skip_incomplete: bool = False
  split_seed: int = 0
  split_fractions: Tuple[float, ...] = builder_lib.DEFAULT_SPLIT_FRACTIONS
  labels: builder_lib.LabelSettings = builder_lib.LabelSettings()
  volume: volumes.VolumeSettings = volumes.VolumeSettings()


@dataclasses.dataclass(frozen=True)
class Subject:
  """The files of one subject (absolute paths)."""

  name: str
  images: Dict[str, str]
  mask: Optional[str]


# ----------------------------------------------------------------- config ---


def settings(data_cfg) -> NiftiSettings:
  """:class:`NiftiSettings` from the ``data`` section (no file access)."""
  root = os.path.abspath(os.path.expanduser(str(data_cfg.get("root", ""))))
  return builder_lib.settings_from(
      NiftiSettings, data_cfg, root=root,
      modalities=dict(builder_lib.plain(data_cfg.get("modalities", {}))),
      labels=builder_lib.settings_from(builder_lib.LabelSettings, data_cfg),
      volume=builder_lib.settings_from(volumes.VolumeSettings, data_cfg))


def _optional_keys() -> Tuple[str, ...]:
  own = [f.name for f in dataclasses.fields(NiftiSettings)
         if f.name not in _REQUIRED + ("labels", "volume")]
  return tuple(own + [f.name for f in dataclasses.fields(
      builder_lib.LabelSettings)] + [f.name for f in dataclasses.fields(
          volumes.VolumeSettings)])


def pattern_problems(name: str, pattern: str) -> List[str]:
  if not isinstance(pattern, str) or "{subject}" not in pattern:
    return [f"data.{name}={pattern!r} must be a path pattern containing "
            "'{subject}' (e.g. '{subject}/t1.nii.gz')"]
  return []


def validate_config(data_cfg) -> List[str]:
  """Problems of a ``nifti_folder`` data section, one message each."""
  errors = builder_lib.check_keys(data_cfg, NAME, _REQUIRED, _optional_keys())
  if errors:
    return errors
  try:
    s = settings(data_cfg)
  except (TypeError, ValueError) as e:
    return [f"data: {e}"]
  if not s.modalities:
    errors.append("data.modalities is empty: map feature names to path "
                  "patterns, e.g. {'t1': '{subject}/t1.nii.gz'}")
  for m, p in s.modalities.items():
    errors += pattern_problems(f"modalities.{m}", p)
    if m in ("mask", "label", "subject", "subject_id", "slice_index"):
      errors.append(f"data.modalities: {m!r} is a reserved feature name")
  if s.mask:
    errors += pattern_problems("mask", s.mask)
  errors += s.volume.problems() + s.labels.problems(bool(s.mask))
  errors += builder_lib.check_contrasts(data_cfg.contrasts,
                                        tuple(s.modalities), NAME)
  errors += builder_lib.check_num_classes(data_cfg, s.labels.names())
  return errors


# ------------------------------------------------------------- discovery ---


def match_files(files: Sequence[str], pattern: str) -> Dict[str, List[str]]:
  """Subject name -> matching relative paths."""
  rx = builder_lib.pattern_regex(pattern)
  out: Dict[str, List[str]] = {}
  for f in files:
    m = rx.fullmatch(f)
    if m:
      out.setdefault(m.group("subject"), []).append(f)
  return out


def _one_file(root: str, subject: str, what: str, pattern: str,
              found: Mapping[str, List[str]]) -> Optional[str]:
  paths = found.get(subject, [])
  if len(paths) > 1:
    what = "the label map" if what == "mask" else f"modality {what!r}"
    raise file_error(os.path.join(root, paths[0]), (
        f"{len(paths)} files match {what} pattern {pattern!r} for subject "
        f"{subject!r} ({paths}); make the pattern more specific"))
  return os.path.join(root, paths[0]) if paths else None


def find_subjects(s: NiftiSettings) -> List[Subject]:
  """Subjects with their files; checks presence, not contents.

  Raises:
    DataError: an empty folder, a pattern matching nothing, a subject
      missing a modality or label map, or an ambiguous pattern.
  """
  root = builder_lib.require_dir(s.root)
  files = builder_lib.walk_files(root)
  if not files:
    raise DataError(f"{root}: empty folder (no files)")
  patterns = dict(s.modalities)
  if s.mask:
    patterns["mask"] = s.mask
  found = {}
  for name, pattern in patterns.items():
    found[name] = match_files(files, pattern)
    if not found[name]:
      what = "label map" if name == "mask" else f"modality {name!r}"
      raise DataError(f"{root}: no file matches the {what} pattern "
                      f"{pattern!r} (files include {files[:3]})")
  names = sorted(set().union(*[set(f) for f in found.values()]))
  subjects = []
  for subject in names:
    paths = {k: _one_file(root, subject, k, patterns[k], found[k])
             for k in patterns}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
      k = missing[0]
      what = "label map" if k == "mask" else f"modality {k!r}"
      expected = os.path.join(root, patterns[k].replace("{subject}", subject))
      msg = (f"missing {what} for subject {subject!r}: no file matches "
             f"{expected!r}")
      if not s.skip_incomplete:
        raise DataError(f"{expected}: {msg} (set data.skip_incomplete=True "
                        "to skip such subjects)")
      logging.warning("skipping subject: %s", msg)
      continue
    subjects.append(Subject(subject,
                            {m: paths[m] for m in s.modalities},
                            paths.get("mask")))
  return subjects


# ------------------------------------------------------------------ reading --


def header_grid(path: str) -> Tuple[Tuple[int, ...], np.ndarray, str]:
  """``(3D shape, RAS affine, path)`` from the header only."""
  grid = volume_files.read_grid(path)
  return grid.shape, grid.affine, path


def read_scan(path: str, mask_values: Optional[Sequence[int]] = None
              ) -> volumes.Scan:
  """A volume as a :class:`~medgen_jax.data.volumes.Scan`.

  Images are float32 (8/16-bit, integer or float storage, with NIfTI
  scaling applied); label maps (``mask_values`` given) become uint8 classes.
  """
  data, affine = volume_files.read_volume(path)
  if mask_values is not None:
    data = volumes.check_mask_values(data, mask_values, path)
  return volumes.Scan(data, affine, path)


def check_subject(subject: Subject, tol: float) -> None:
  """Shapes and affines of all the subject's files agree (headers only)."""
  paths = list(subject.images.values()) + (
      [subject.mask] if subject.mask else [])
  ref = header_grid(paths[0])
  for p in paths[1:]:
    volumes.check_same_grid(ref, header_grid(p), tol)


# ------------------------------------------------------------------ builder --


def _features(s: NiftiSettings) -> tfds.features.FeaturesDict:
  v = s.volume
  feats = builder_lib.image_features(s.modalities, v.shape,
                                     ("mask",) if s.mask else ())
  feats["label"] = tfds.features.ClassLabel(names=list(s.labels.names()))
  feats.update(builder_lib.id_features())
  if v.patches:
    feats["patch_origin"] = tfds.features.Tensor(shape=(3,), dtype=np.int32)
  return tfds.features.FeaturesDict(feats)


class NiftiFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Co-registered volumes per subject, as slices, volumes or patches."""

  VERSION = tfds.core.Version(builder_lib.VERSION)
  RELEASE_NOTES = {builder_lib.VERSION: "Initial release."}

  def __init__(self, *, settings: NiftiSettings,  # pylint: disable=redefined-outer-name
               subjects: Sequence[Subject] = (), **kwargs):
    self._settings = settings
    self._levels: Dict[str, Dict[str, float]] = {}
    self._num_subjects = 0
    self._subjects = tuple(subjects)
    super().__init__(file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._settings
    return self.dataset_info_from_configs(
        description=(f"3D volumes from {s.root} (modalities "
                     f"{sorted(s.modalities)}), split by subject."),
        features=_features(s),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    s = self._settings
    for subject in self._subjects:  # headers first: fail before writing.
      check_subject(subject, s.affine_tol)
    names = [x.name for x in self._subjects]
    labels, explicit = builder_lib.subject_labels(s.labels, names, s.root)
    splits = builder_lib.assign_splits(names, s.split_seed, s.split_fractions,
                                       explicit, source=s.root)
    self.info.metadata.update(subjects={k: list(v) for k, v in splits.items()},
                              root=s.root)
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
      images = {m: read_scan(p) for m, p in subject.images.items()}
      self._levels[subject.name] = {m: volumes.bright_level(x)
                                    for m, x in images.items()}
      mask = (read_scan(subject.mask, s.mask_values)
              if subject.mask else None)
      for key, ex in volumes.subject_examples(
          images, mask, s.volume, subject=subject.name,
          subject_id=ids[subject.name], label=labels[subject.name],
          label_source=s.labels.label_source, reorient=s.reorient):
        count += 1
        yield key, ex
    builder_lib.require_examples(
        count, split, f"subjects {[x.name for x in subjects]} gave no "
        "slices/patches above data.min_foreground; lower it")
    if len(self._levels) == self._num_subjects:
      # CT is in Hounsfield units: its levels are meant to be absolute.
      volumes.warn_intensity_outliers(self._levels, s.volume,
                                      skip=volumes.ct_names(self._levels))


def load_builder(data_cfg, subjects: Sequence[Subject] = ()
                 ) -> tfds.core.DatasetBuilder:
  """The builder of ``data_cfg`` (lists the files; builds nothing).

  The data set built with the same settings from the same files (paths,
  sizes, modification times) is opened directly when it exists.
  """
  errors = validate_config(data_cfg)
  if errors:
    raise ValueError("invalid nifti_folder config:\n  - " +
                     "\n  - ".join(errors))
  s = settings(data_cfg)
  subjects = subjects or find_subjects(s)
  files = [p for x in subjects for p in (*x.images.values(), x.mask) if p]
  if s.labels.labels_csv:
    csv_path = builder_lib.resolve_path(s.labels.labels_csv, s.root)
    files += [csv_path] if os.path.isfile(csv_path) else []
  name = builder_lib.config_name(os.path.basename(s.root), s,
                                 builder_lib.source_fingerprint(files))
  done = builder_lib.prepared_builder(data_cfg.data_dir, NAME, name)
  if done is not None:
    return done
  config = builder_lib.FolderConfig(
      name=name, version=builder_lib.VERSION,
      description=f"{len(subjects)} subjects from {s.root}",
      settings=builder_lib.settings_json(s))
  return NiftiFolder(settings=s, subjects=subjects, config=config,
                     data_dir=str(data_cfg.data_dir))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """:func:`load_builder`, building the data set first if it is missing."""
  return builder_lib.build(load_builder(data_cfg), str(data_cfg.data_dir))

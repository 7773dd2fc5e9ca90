"""TFDS builder for folders of 2D images (PNG, JPEG, TIFF, BMP, DICOM).

Two layouts::

  with a labels CSV     root/any/path.png + labels.csv with columns
                        file (relative to root), label, and optionally
                        subject (patient-level split) and split
  class folders         root/<class name>/<image>  (no CSV)

An optional ``data.masks_dir`` holds a label map per image at the same
relative path (any supported extension), e.g. ``masks/any/path.png``.

8-bit, 16-bit, 32-bit integer and float (TIFF) images keep their values
(as float32); all images of a data set must share one bit depth. Grayscale
sets have the feature ``image``; ``data.color_mode="rgb"`` gives ``red``,
``green`` and ``blue`` (grayscale images are replicated). Images are padded
to a square (``data.keep_aspect``) and resized to ``res x res``; masks with
nearest neighbour. Splits are by subject (each image is its own subject
unless the CSV has a ``subject`` column).

DICOM files (``*.dcm`` or extensionless with the DICOM preamble) are 2D
images too: radiographs, mammograms, ultrasound, single slices
(:mod:`medgen_jax.data.dicom_images`: modality LUT, VOI window
``data.dicom_window``, MONOCHROME1 inverted, cine loops per
``data.dicom_frames``, pixel spacing kept). Their subject is their
PatientID (``data.subject_tag``) unless the CSV names one, so a patient's
images stay in one split.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from medgen_jax.data import builder_lib
from medgen_jax.data import dicom_images
from medgen_jax.data import preprocess
from medgen_jax.data.builder_lib import DataError, file_error

NAME = "image_folder"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
COLOR_MODES = ("gray", "rgb")
_REQUIRED = ("root", "class_names")
# Luminance weights (ITU-R BT.601), as PIL's "L" conversion.
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


@dataclasses.dataclass(frozen=True)
class ImageFolderSettings:
  """What determines the built data set (hashed into its name)."""

  root: str
  class_names: Tuple[str, ...]
  labels_csv: str = ""
  images_glob: str = "**/*"
  file_column: str = "file"
  label_column: str = "label"
  subject_column: str = "subject"
  masks_dir: str = ""
  mask_values: Tuple[int, ...] = ()
  color_mode: str = "gray"
  res: int = 64
  keep_aspect: bool = True
  split_seed: int = 0
  split_fractions: Tuple[float, ...] = builder_lib.DEFAULT_SPLIT_FRACTIONS
  # DICOM only (see medgen_jax.data.dicom_images).
  dicom_window: Any = "auto"
  dicom_frames: str = "refuse"
  subject_tag: str = "PatientID"

  @property
  def channels(self) -> Tuple[str, ...]:
    return ("image",) if self.color_mode == "gray" else ("red", "green",
                                                         "blue")


@dataclasses.dataclass(frozen=True)
class Item:
  """One image: relative path, absolute paths, class, subject; a DICOM
  image also has its frame and what its values mean."""

  file: str
  path: str
  mask: Optional[str]
  label: int
  subject: str
  frame: int = -1
  units: str = ""

  @property
  def key(self) -> str:
    return self.file if self.frame < 0 else f"{self.file}#{self.frame + 1}"


def settings(data_cfg) -> ImageFolderSettings:
  root = os.path.abspath(os.path.expanduser(str(data_cfg.get("root", ""))))
  return builder_lib.settings_from(ImageFolderSettings, data_cfg, root=root)


def validate_config(data_cfg) -> List[str]:
  """Problems of an ``image_folder`` data section, one message each."""
  optional = [f.name for f in dataclasses.fields(ImageFolderSettings)
              if f.name not in _REQUIRED]
  errors = builder_lib.check_keys(data_cfg, NAME, _REQUIRED, optional)
  if errors:
    return errors
  s = settings(data_cfg)
  if not s.class_names:
    errors.append("data.class_names is empty: list the classes in label "
                  "order")
  if len(set(s.class_names)) != len(s.class_names):
    errors.append(f"data.class_names={s.class_names} has duplicates")
  if s.color_mode not in COLOR_MODES:
    errors.append(f"data.color_mode={s.color_mode!r} must be one of "
                  f"{COLOR_MODES}")
  errors += dicom_images.window_problems(s.dicom_window)
  if s.dicom_frames not in dicom_images.FRAME_MODES:
    errors.append(f"data.dicom_frames={s.dicom_frames!r} must be one of "
                  f"{dicom_images.FRAME_MODES}")
  if data_cfg.spatial_dims != 2:
    errors.append(f"data.spatial_dims={data_cfg.spatial_dims}: image_folder "
                  "holds 2D images")
  errors += builder_lib.check_contrasts(data_cfg.contrasts, s.channels, NAME)
  errors += builder_lib.check_num_classes(data_cfg, s.class_names)
  return errors


# --------------------------------------------------------------- discovery --


def _is_image(root: str, name: str) -> bool:
  return (name.lower().endswith(IMAGE_SUFFIXES) or
          dicom_images.is_dicom(os.path.join(root, name)))


def _is_dicom(path: str) -> bool:
  return not path.lower().endswith(IMAGE_SUFFIXES) and dicom_images.is_dicom(
      path)


def _find_mask(masks_root: str, rel: str) -> Optional[str]:
  stem = os.path.splitext(rel)[0]
  if os.path.isfile(os.path.join(masks_root, rel)):
    return os.path.join(masks_root, rel)
  for ext in IMAGE_SUFFIXES + dicom_images.DICOM_SUFFIXES:
    for cand in (stem + ext, stem + ext.upper()):
      if os.path.isfile(os.path.join(masks_root, cand)):
        return os.path.join(masks_root, cand)
  return None


def find_items(s: ImageFolderSettings) -> List[Item]:
  """The images with labels, subjects and masks (files are not read).

  Raises:
    DataError: empty folder, missing files, unknown labels, missing masks.
  """
  root = builder_lib.require_dir(s.root)
  masks_root = builder_lib.resolve_path(s.masks_dir, root)
  if masks_root:
    builder_lib.require_dir(masks_root, "data.masks_dir")
  if s.labels_csv:
    path = builder_lib.resolve_path(s.labels_csv, root)
    table = builder_lib.read_csv_table(path, s.file_column,
                                       (s.label_column,))
    files = sorted(table.rows)
    for f in files:
      if not os.path.isfile(os.path.join(root, f)):
        raise file_error(os.path.join(root, f), (
            f"listed on line {table.line[f]} of {path} but not found"))
    labels = builder_lib.labels_from_table(table, files, s.label_column,
                                           s.class_names)
    has_subject = s.subject_column in next(iter(table.rows.values()))
    subjects = {f: table.rows[f][s.subject_column] for f in files
                if has_subject}
  else:
    rx = builder_lib.pattern_regex(s.images_glob.replace("{subject}", "*"))
    masks_rel = (os.path.relpath(masks_root, root) + "/"
                 if masks_root else None)
    files = [f for f in builder_lib.walk_files(root)
             if rx.fullmatch(f) and not (
                 masks_rel and f.startswith(masks_rel)) and _is_image(root, f)]
    if not files:
      raise DataError(f"{root}: empty folder (no {'/'.join(IMAGE_SUFFIXES)} "
                      f"or DICOM images matching {s.images_glob!r})")
    labels = {}
    for f in files:
      folder = f.split("/")[0] if "/" in f else ""
      if not folder:
        raise file_error(os.path.join(root, f), (
            "not in a class folder; without data.labels_csv images must "
            "lie in root/<class name>/"))
      if folder not in s.class_names:
        raise file_error(os.path.join(root, f), (
            f"unknown label: class folder {folder!r} is not in "
            f"data.class_names={s.class_names}"))
      labels[f] = s.class_names.index(folder)
    subjects = {}
  items = []
  for f in files:
    mask = None
    if masks_root:
      mask = _find_mask(masks_root, f)
      if mask is None:
        raise file_error(os.path.join(masks_root, f), (
            f"missing mask of image {f!r} (expected the same relative path "
            f"with one of {IMAGE_SUFFIXES + dicom_images.DICOM_SUFFIXES})"))
    path = os.path.join(root, f)
    if not _is_dicom(path):
      items.append(Item(f, path, mask, labels[f], subjects.get(f, f)))
      continue
    ds = dicom_images.read_header(path)
    subject = subjects.get(f) or dicom_images.subject_of(ds, s.subject_tag, f)
    units = dicom_images.units(ds, s.dicom_window)
    frames = dicom_images.frames_of(ds, path, s.dicom_frames)
    items += [Item(f, path, mask, labels[f], subject,
                   k if dicom_images.num_frames(ds) > 1 else -1, units)
              for k in frames]
  return items


# ------------------------------------------------------------------ reading --


def read_array(path: str) -> np.ndarray:
  """Pixel values with their stored dtype: ``[H, W]`` or ``[H, W, 3]``."""
  try:
    with Image.open(path) as img:
      if getattr(img, "n_frames", 1) > 1:
        raise file_error(path, f"{img.n_frames} frames (a stack); "
                         "image_folder reads single 2D images")
      img.load()
      if img.mode in ("RGBA", "LA", "CMYK", "YCbCr", "P", "PA", "HSV"):
        img = img.convert("RGB" if img.mode not in ("LA",) else "L")
      elif img.mode == "1":
        img = img.convert("L")
      arr = np.asarray(img)
  except DataError:
    raise
  except Exception as e:  # PIL raises OSError/SyntaxError/... for bad files.
    raise file_error(path, f"unreadable image, corrupt or truncated "
                     f"({builder_lib.describe(e)})") from None
  if arr.dtype.byteorder == ">":
    arr = arr.astype(arr.dtype.newbyteorder("="))
  return arr


def read_mask(path: str) -> np.ndarray:
  """A label image's raw values ``[H, W]`` (palette indices kept)."""
  try:
    with Image.open(path) as img:
      img.load()
      arr = np.asarray(img.convert("L") if img.mode == "1" else img)
  except Exception as e:  # as in read_array.
    raise file_error(path, f"unreadable mask, corrupt or truncated "
                     f"({builder_lib.describe(e)})") from None
  if arr.ndim != 2:
    raise file_error(path, f"mask has shape {arr.shape}; a label map is a "
                     "single-channel image")
  return arr


def bit_depth(path: str) -> str:
  """``8-bit``, ``16-bit``, ``32-bit`` (integers) or ``float``, from the
  header (the pixels are not read)."""
  try:
    with Image.open(path) as img:
      mode = img.mode
  except Exception as e:  # as in read_array.
    raise file_error(path, f"unreadable image, corrupt or truncated "
                     f"({builder_lib.describe(e)})") from None
  if mode.startswith("I;16"):
    return "16-bit"
  return {"I": "32-bit", "F": "float"}.get(mode, "8-bit")


def check_bit_depths(items: Sequence[Item]) -> str:
  """The one bit depth (DICOM: value meaning) of all images; mixed depths
  mix units."""
  found = [(it.path, it.units or bit_depth(it.path)) for it in items]
  if any(it.units for it in items):
    return dicom_images.check_units(found)
  (p0, first) = found[0]
  for p, d in found[1:]:
    if d != first:
      raise file_error(p, f"{d} image among {first} images (e.g. "
                       f"{p0}); convert the data set to one bit depth")
  return first


def read_item(it: Item, s: ImageFolderSettings
              ) -> Tuple[np.ndarray, Tuple[float, float]]:
  """The pixels ``[H, W]`` or ``[H, W, 3]`` and ``(row, col)`` spacing."""
  if not it.units:
    return read_array(it.path), (1.0, 1.0)
  img = dicom_images.read_image(it.path, max(it.frame, 0), s.dicom_window)
  return img.pixels, img.spacing


def read_item_mask(it: Item) -> np.ndarray:
  if _is_dicom(it.mask):
    return dicom_images.read_mask(it.mask, max(it.frame, 0))
  return read_mask(it.mask)


def to_channels(arr: np.ndarray, color_mode: str, path: str
                ) -> List[np.ndarray]:
  """float32 planes ``[H, W]``: one (gray) or three (rgb)."""
  x = arr.astype(np.float32)
  bad = preprocess.non_finite_count(x)
  if bad:
    raise file_error(path, f"{bad} NaN/Inf pixels")
  if color_mode == "gray":
    return [x @ _LUMA if x.ndim == 3 else x]
  if x.ndim == 2:
    return [x, x, x]
  return [x[..., c] for c in range(3)]


# ------------------------------------------------------------------ builder --


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """2D images with class labels and optional label maps."""

  VERSION = tfds.core.Version(builder_lib.VERSION)
  RELEASE_NOTES = {builder_lib.VERSION: "Initial release."}

  def __init__(self, *, settings: ImageFolderSettings,  # pylint: disable=redefined-outer-name
               items: Sequence[Item] = (), **kwargs):
    self._settings = settings
    self._items = tuple(items)
    super().__init__(file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._settings
    has_mask = bool(s.masks_dir)
    feats = builder_lib.image_features(s.channels, (s.res, s.res),
                                       ("mask",) if has_mask else ())
    feats["label"] = tfds.features.ClassLabel(names=list(s.class_names))
    feats["file"] = tfds.features.Text()
    feats.update(builder_lib.id_features(slice_index=False))
    return self.dataset_info_from_configs(
        description=f"2D images from {s.root}, split by subject.",
        features=tfds.features.FeaturesDict(feats),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    s = self._settings
    depth = check_bit_depths(self._items)
    subjects = sorted({it.subject for it in self._items})
    explicit = None
    if s.labels_csv:
      table = builder_lib.read_csv_table(
          builder_lib.resolve_path(s.labels_csv, s.root), s.file_column)
      per_file = builder_lib.splits_from_table(
          table, [it.file for it in self._items])
      if per_file:
        explicit = _subject_splits(per_file, self._items, table.path)
    splits = builder_lib.assign_splits(subjects, s.split_seed,
                                       s.split_fractions, explicit,
                                       source=s.root)
    self.info.metadata.update(subjects={k: list(v) for k, v in splits.items()},
                              root=s.root, bit_depth=depth)
    ids = {n: i for i, n in enumerate(subjects)}
    return {split: self._generate_examples(
        split, [it for it in self._items if it.subject in set(sel)], ids)
            for split, sel in splits.items()}

  def _generate_examples(self, split, items, ids):
    s = self._settings
    for it in items:
      arr, spacing = read_item(it, s)
      planes = to_channels(arr, s.color_mode, it.path)
      ex = {}
      for c, p in zip(s.channels, planes):
        if s.keep_aspect:
          p = preprocess.pad_to_extent(p, spacing, float(p.min()))
        ex[c] = preprocess.resize(p, (s.res, s.res))
      if it.mask:
        m = read_item_mask(it)
        if m.shape != arr.shape[:2]:
          raise file_error(it.mask, f"mask shape {m.shape} differs from "
                           f"image shape {arr.shape[:2]} of {it.path}")
        labels, problem = preprocess.mask_to_labels(m, s.mask_values)
        if labels is None:
          raise file_error(it.mask, problem)
        if s.keep_aspect:
          labels = preprocess.pad_to_extent(labels, spacing, 0)
        ex["mask"] = preprocess.resize(labels, (s.res, s.res), nearest=True)
      ex.update(label=it.label, file=it.key, subject=it.subject,
                subject_id=np.int32(ids[it.subject]))
      yield it.key, ex
    builder_lib.require_examples(len(items), split, "no images")


def _subject_splits(per_file: Dict[str, str], items: Sequence[Item],
                    csv_path: str) -> Dict[str, str]:
  """One split per subject; all images of a subject must agree."""
  out: Dict[str, str] = {}
  for it in items:
    split = per_file[it.file]
    if out.setdefault(it.subject, split) != split:
      raise file_error(csv_path, f"subject {it.subject!r} has images in "
                       f"splits {out[it.subject]!r} and {split!r}")
  return out


def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The builder of ``data_cfg`` (lists the files; builds nothing); an
  existing build of the same settings and files is opened directly."""
  errors = validate_config(data_cfg)
  if errors:
    raise ValueError("invalid image_folder config:\n  - " +
                     "\n  - ".join(errors))
  s = settings(data_cfg)
  items = find_items(s)
  files = [p for it in items for p in (it.path, it.mask) if p]
  if s.labels_csv:
    files.append(builder_lib.resolve_path(s.labels_csv, s.root))
  name = builder_lib.config_name(os.path.basename(s.root), s,
                                 builder_lib.source_fingerprint(files))
  done = builder_lib.prepared_builder(data_cfg.data_dir, NAME, name)
  if done is not None:
    return done
  config = builder_lib.FolderConfig(
      name=name, version=builder_lib.VERSION,
      description=f"{len(items)} images from {s.root}",
      settings=builder_lib.settings_json(s))
  return ImageFolder(settings=s, items=items, config=config,
                     data_dir=str(data_cfg.data_dir))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """:func:`load_builder`, building the data set first if it is missing."""
  return builder_lib.build(load_builder(data_cfg), str(data_cfg.data_dir))

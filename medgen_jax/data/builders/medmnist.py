"""TFDS builder for the MedMNIST v2/v3 and MedMNIST+ data sets.

Reads the official ``<flag>.npz`` / ``<flag>_<size>.npz`` files (keys
``{train,val,test}_{images,labels}``) from a manual directory, by default
``<data_dir>/downloads/manual``. Nothing is downloaded unless the config asks
for it (``data.download=True``). The official splits are kept (MedMNIST has
no subject ids, so every image counts as its own subject).

Features: ``image`` (grayscale) or ``red``/``green``/``blue`` (RGB sets),
float32 in the files' 0..255 units, ``[res, res]`` or ``[res]*3``; ``label``
(the class; for the multi-label ChestMNIST whether any finding is present),
``findings`` (ChestMNIST's 14 binary labels), ``subject_id`` (the image's
index over train+val+test) and ``subject`` (``<split>_<index>``).

Usage::

  config.data = common.medmnist_data_config(flag="pathmnist", size=64)
  builder = prepare(config.data)
"""

import dataclasses
import os
import urllib.error
import urllib.request
import zipfile
from typing import List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from medgen_jax.data import builder_lib
from medgen_jax.data import medmnist_info
from medgen_jax.data import preprocess
from medgen_jax.data.builder_lib import file_error

NAME = "medmnist"
_REQUIRED = ("flag",)
_OPTIONAL = ("size", "manual_dir", "download", "download_url")


@dataclasses.dataclass(frozen=True)
class MedMnistSettings:
  """What determines the built data set (hashed into its name).

  Attributes:
    flag: data set name, e.g. ``pathmnist`` or ``organmnist3d``.
    size: image side of the file (28, 64, 128, 224).
    res: output side (resized at build time when it differs from ``size``).
  """

  flag: str
  size: int = 28
  res: int = 28


def settings(data_cfg) -> MedMnistSettings:
  size = int(data_cfg.get("size", 28))
  return MedMnistSettings(flag=str(data_cfg.get("flag", "")), size=size,
                          res=int(data_cfg.get("res") or size))


def manual_dir(data_cfg) -> str:
  d = data_cfg.get("manual_dir") or os.path.join(str(data_cfg.data_dir),
                                                 "downloads", "manual")
  return os.path.abspath(os.path.expanduser(str(d)))


def validate_config(data_cfg) -> List[str]:
  """Problems of a ``medmnist`` data section, one message each."""
  errors = builder_lib.check_keys(data_cfg, NAME, _REQUIRED, _OPTIONAL)
  if errors:
    return errors
  s = settings(data_cfg)
  try:
    info = medmnist_info.info(s.flag)
    medmnist_info.file_name(s.flag, s.size)
  except ValueError as e:
    return [f"data.flag/data.size: {e}"]
  if data_cfg.spatial_dims != info.spatial_dims:
    errors.append(f"data.spatial_dims={data_cfg.spatial_dims} but {s.flag} "
                  f"is {info.spatial_dims}D")
  errors += builder_lib.check_contrasts(
      data_cfg.contrasts, medmnist_info.channel_names(s.flag), NAME)
  errors += builder_lib.check_num_classes(
      data_cfg, medmnist_info.class_names(s.flag))
  return errors


# ---------------------------------------------------------------- the file --


def download(url: str, path: str) -> None:
  """Fetches ``url`` into ``path`` atomically (temp file, then rename)."""
  logging.info("downloading %s -> %s", url, path)
  try:
    with urllib.request.urlopen(url, timeout=60) as r:
      builder_lib.atomic_write_bytes(
          path, iter(lambda: r.read(1 << 20), b""))
  except (urllib.error.URLError, OSError) as e:
    raise file_error(path, f"download from {url} failed ({e}); fetch the file "
                     "by hand and put it there") from None


def locate(data_cfg) -> str:
  """Path of the ``.npz`` file, downloading it only if asked to."""
  s = settings(data_cfg)
  name = medmnist_info.file_name(s.flag, s.size)
  path = os.path.join(manual_dir(data_cfg), name)
  if os.path.isfile(path):
    return path
  url = str(data_cfg.get("download_url") or medmnist_info.DOWNLOAD_URL)
  url = url.format(file=name)
  if not data_cfg.get("download", False):
    raise file_error(path, f"MedMNIST file not found. Download {name} from "
                     f"{url} into {os.path.dirname(path)} (or set "
                     "data.manual_dir to where it is, or data.download=True "
                     "to fetch it)")
  download(url, path)
  return path


def _split_arrays(path: str, z, split: str, images: bool = True
                  ) -> Tuple[Optional[np.ndarray], np.ndarray]:
  """``(images or None, labels)`` of ``split``; errors name the file."""
  try:
    labels = z[f"{split}_labels"]
    images = z[f"{split}_images"] if images else None
  except KeyError as e:
    raise file_error(path, f"no array {e} (a MedMNIST file has "
                     "{train,val,test}_{images,labels})") from None
  except Exception as e:  # zlib/zipfile errors of a damaged member.
    raise file_error(path, f"corrupt or truncated data of split {split!r} "
                     f"({builder_lib.describe(e)})") from None
  return images, labels


def member_shape(path: str, z, key: str) -> Tuple[int, ...]:
  """Shape of array ``key`` of an open npz, from its header only."""
  readers = {(1, 0): np.lib.format.read_array_header_1_0,
             (2, 0): np.lib.format.read_array_header_2_0}
  try:
    with z.zip.open(key + ".npy") as f:
      version = np.lib.format.read_magic(f)
      if version in readers:
        return tuple(readers[version](f)[0])
    return tuple(z[key].shape)
  except Exception as e:  # damaged member headers.
    raise file_error(path, f"corrupt array {key} "
                     f"({builder_lib.describe(e)})") from None


def check_image_shape(path: str, split: str, shape: Tuple[int, ...],
                      s: MedMnistSettings) -> None:
  info = medmnist_info.info(s.flag)
  want = (s.size,) * info.spatial_dims + (
      (3,) if info.n_channels == 3 else ())
  if len(shape) != len(want) + 1 or tuple(shape[1:]) != want:
    raise file_error(path, f"{split}_images has shape {tuple(shape)}; "
                     f"expected [N, {', '.join(map(str, want))}] for "
                     f"{s.flag} at size {s.size}")


def check_labels(path: str, split: str, labels: np.ndarray, n: int,
                 s: MedMnistSettings) -> np.ndarray:
  """Checks the label array of ``n`` images; returns it as ``[N, L]`` ints."""
  info = medmnist_info.info(s.flag)
  labels = labels.reshape(len(labels), -1) if labels.ndim else labels
  if len(labels) != n:
    raise file_error(path, f"{split}_labels has {len(labels)} rows but "
                     f"{split}_images has {n} images")
  width = len(info.labels) if info.task == "multi-label" else 1
  if labels.shape[1] != width:
    raise file_error(path, f"{split}_labels has {labels.shape[1]} columns, "
                     f"expected {width}")
  top = 2 if info.task == "multi-label" else len(info.labels)
  bad = (labels < 0) | (labels >= top) | (labels != np.round(labels))
  if bad.any():
    raise file_error(path, f"{split}_labels has unknown label value "
                     f"{labels[bad][0].item():g} (expected 0..{top - 1})")
  return labels.astype(np.int64)


def check_file(path: str) -> None:
  """The file is a readable zip with the six MedMNIST arrays."""
  try:
    with np.load(path) as z:
      keys = set(z.files)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise file_error(path, f"not a readable .npz file, corrupt or truncated "
                     f"({builder_lib.describe(e)})") from None
  need = {f"{s}_{k}" for s in builder_lib.SPLITS for k in ("images",
                                                           "labels")}
  if need - keys:
    raise file_error(path, f"missing arrays {sorted(need - keys)} (has "
                     f"{sorted(keys)})")


# ----------------------------------------------------------------- builder --


def _features(s: MedMnistSettings) -> tfds.features.FeaturesDict:
  info = medmnist_info.info(s.flag)
  feats = builder_lib.image_features(medmnist_info.channel_names(s.flag),
                                     (s.res,) * info.spatial_dims)
  feats["label"] = tfds.features.ClassLabel(
      names=list(medmnist_info.class_names(s.flag)))
  if info.task == "multi-label":
    feats["findings"] = tfds.features.Tensor(shape=(len(info.labels),),
                                             dtype=np.uint8)
  feats.update(builder_lib.id_features(slice_index=False))
  return tfds.features.FeaturesDict(feats)


class Medmnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """MedMNIST(+) 2D/3D images with the official splits."""

  VERSION = tfds.core.Version(builder_lib.VERSION)
  RELEASE_NOTES = {builder_lib.VERSION: "Initial release."}

  def __init__(self, *, settings: MedMnistSettings, path: str = "",  # pylint: disable=redefined-outer-name
               **kwargs):
    self._settings = settings
    self._path = path
    super().__init__(file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._settings
    info = medmnist_info.info(s.flag)
    return self.dataset_info_from_configs(
        description=(f"MedMNIST {s.flag} ({info.modality}, {info.task}) at "
                     f"{s.size} px" + (f", resized to {s.res}"
                                       if s.res != s.size else "")),
        features=_features(s),
        homepage="https://medmnist.com/",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(task=info.task,
                                        findings=list(info.labels)))

  def _split_generators(self, dl_manager):
    del dl_manager  # The file is local (see `locate`).
    check_file(self._path)
    counts = []
    with np.load(self._path) as z:  # every check before anything is written.
      for split in builder_lib.SPLITS:
        shape = member_shape(self._path, z, f"{split}_images")
        check_image_shape(self._path, split, shape, self._settings)
        _, labels = _split_arrays(self._path, z, split, images=False)
        check_labels(self._path, split, labels, shape[0], self._settings)
        counts.append(shape[0])
    offsets = dict(zip(builder_lib.SPLITS, np.cumsum([0] + counts[:-1])))
    return {split: self._generate_examples(split, int(offsets[split]))
            for split in builder_lib.SPLITS}

  def _generate_examples(self, split: str, offset: int):
    s = self._settings
    info = medmnist_info.info(s.flag)
    channels = medmnist_info.channel_names(s.flag)
    with np.load(self._path) as z:
      images, labels = _split_arrays(self._path, z, split)
    check_image_shape(self._path, split, images.shape, s)
    labels = check_labels(self._path, split, labels, len(images), s)
    if np.issubdtype(images.dtype, np.floating):
      bad = preprocess.non_finite_count(images)
      if bad:
        raise file_error(self._path, f"{split}_images has {bad} NaN/Inf "
                         "values")
    builder_lib.require_examples(len(images), split,
                                 f"{self._path} has no {split} images")
    shape = (s.res,) * info.spatial_dims
    for i, (img, lab) in enumerate(zip(images, labels)):
      img = img.astype(np.float32)
      planes = ([img[..., c] for c in range(3)] if len(channels) == 3
                else [img])
      ex = {c: preprocess.resize(p, shape) for c, p in zip(channels, planes)}
      if info.task == "multi-label":
        ex["label"] = int(lab.any())
        ex["findings"] = lab.astype(np.uint8)
      else:
        ex["label"] = int(lab[0])
      ex.update(subject_id=np.int32(offset + i), subject=f"{split}_{i}")
      yield f"{split}_{i:07d}", ex


_CITATION = """\
@article{medmnistv2,
  title={MedMNIST v2-A large-scale lightweight benchmark for 2D and 3D
         biomedical image classification},
  author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and
          Zhao, Lin and Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
  journal={Scientific Data},
  volume={10},
  number={1},
  pages={41},
  year={2023}
}
"""


def load_builder(data_cfg) -> tfds.core.DatasetBuilder:
  """The builder of ``data_cfg`` (finds the file; builds nothing); an
  existing build of the same settings and file is opened directly."""
  errors = validate_config(data_cfg)
  if errors:
    raise ValueError("invalid medmnist config:\n  - " + "\n  - ".join(errors))
  s = settings(data_cfg)
  path = locate(data_cfg)
  name = builder_lib.config_name(f"{s.flag}_{s.size}_r{s.res}", s,
                                 builder_lib.source_fingerprint([path]))
  done = builder_lib.prepared_builder(data_cfg.data_dir, NAME, name)
  if done is not None:
    return done
  config = builder_lib.FolderConfig(
      name=name, version=builder_lib.VERSION,
      description=f"{s.flag} from {path}",
      settings=builder_lib.settings_json(s))
  return Medmnist(settings=s, path=path, config=config,
                  data_dir=str(data_cfg.data_dir))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """:func:`load_builder`, building the data set first if it is missing."""
  return builder_lib.build(load_builder(data_cfg), str(data_cfg.data_dir))


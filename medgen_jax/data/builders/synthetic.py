"""TFDS builder for a synthetic data set exported by a trained generator.

:func:`medgen_jax.downstream.synthetic.export` writes ``samples.npz`` and
``provenance.json`` into a directory; this builder turns them into an
ArrayRecord TFDS data set in ``<directory>/tfds`` (one ``train`` split), so
synthetic data trains any config like real data::

  config.data.dataset = "synthetic"
  config.data.path = "workdirs/study/synthetic/ddpm"

Its features mirror the real data set the generator learned: one float32
feature per contrast (normalised, in [-1, 1]), the generated masks (uint8),
``label``, ``subject_id`` (-1: no real subject) and ``sample_index``.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, Tuple

import numpy as np
import tensorflow_datasets as tfds

from medgen_jax import errors
from medgen_jax.data import builder_lib

SAMPLES = "samples.npz"
PROVENANCE = "provenance.json"


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """One exported synthetic set (the name is a hash of its samples).

  Attributes:
    path: the export directory.
    contrasts: contrast names, in channel order.
    mask_keys: generated masks.
    shape: spatial shape of one image.
    num_classes: label classes.
  """

  path: str = ""
  contrasts: Tuple[str, ...] = ()
  mask_keys: Tuple[str, ...] = ()
  shape: Tuple[int, ...] = ()
  num_classes: int = 2


def read_export(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """``(arrays, provenance)`` of an export directory, with clear errors."""
  samples = os.path.join(path, SAMPLES)
  prov_path = os.path.join(path, PROVENANCE)
  for p in (samples, prov_path):
    if not os.path.exists(p):
      raise errors.MissingFileError(
          f"{p} not found: data.path must be a directory written by "
          "medgen_jax.downstream.synthetic.export")
  try:
    with open(prov_path, encoding="utf-8") as f:
      provenance = json.load(f)
  except ValueError as e:  # JSON and UTF-8 decoding errors
    raise builder_lib.file_error(
        prov_path, f"unreadable ({type(e).__name__}: {e}); export the "
        "set again") from e
  try:
    with np.load(samples) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:  # zipfile/pickle errors: name the file.
    raise builder_lib.file_error(
        samples, f"unreadable ({type(e).__name__}: {e}); export it again"
    ) from e
  return arrays, provenance


def _file_hash(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:12]


class Synthetic(tfds.core.GeneratorBasedBuilder):
  """Generated images with their labels and masks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(
        file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD,
        **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    image = lambda dtype: tfds.features.Tensor(shape=cfg.shape, dtype=dtype)
    return self.dataset_info_from_configs(
        description="Synthetic images sampled from a trained generator; see "
                    "provenance.json beside the samples.",
        features=tfds.features.FeaturesDict({
            **{c: image(np.float32) for c in cfg.contrasts},
            **{m: image(np.uint8) for m in cfg.mask_keys},
            "label": tfds.features.ClassLabel(num_classes=cfg.num_classes),
            "subject_id": tfds.features.Tensor(shape=(), dtype=np.int32),
            "sample_index": tfds.features.Tensor(shape=(), dtype=np.int32),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    arrays, _ = read_export(cfg.path)
    for i in range(len(arrays["label"])):
      ex = {c: arrays["image"][i, ..., j].astype(np.float32)
            for j, c in enumerate(cfg.contrasts)}
      ex.update({m: arrays[m][i].astype(np.uint8) for m in cfg.mask_keys})
      ex.update(label=int(arrays["label"][i]), subject_id=np.int32(-1),
                sample_index=np.int32(i))
      yield i, ex


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
  """Builds (once) and returns the TFDS data set of ``data_cfg.path``."""
  path = os.path.abspath(str(data_cfg.get("path", "")))
  arrays, provenance = read_export(path)
  contrasts = tuple(provenance["contrasts"])
  if arrays["image"].shape[-1] != len(contrasts):
    raise ValueError(f"{os.path.join(path, SAMPLES)}: image has "
                     f"{arrays['image'].shape[-1]} channels but provenance "
                     f"lists contrasts {contrasts}")
  cfg = SyntheticConfig(
      name="h" + _file_hash(os.path.join(path, SAMPLES)),
      version="1.0.0", path=path, contrasts=contrasts,
      mask_keys=tuple(provenance.get("mask_keys", ())),
      shape=tuple(arrays["image"].shape[1:-1]),
      num_classes=int(provenance["num_classes"]))
  data_dir = os.path.join(path, "tfds")
  return builder_lib.build(Synthetic(config=cfg, data_dir=data_dir), data_dir)
